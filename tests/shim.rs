//! The HTML shim over real sockets (SPEC §5 `inject_shim`): injection position, compressed
//! bodies, header fix-ups, streaming with flat memory, `/proxy-sw.js`.

mod support;

use support::{echo_backend, raw, vm_hwm_kib, Edge};

async fn setup() -> (Edge, u16) {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&format!(
        "[[registry.vms]]\nid = \"v\"\naddress = \"127.0.0.1\"\nports = {{ 39378 = {b} }}\n\n\
         [[policy]]\nport = \"*\"\ninject_shim = true\n\n\
         [[policy]]\nport = 39378\ninject_shim = false\n"
    ))
    .await;
    (edge, b)
}

const SHIM_START: &str = "<script data-cmux-shim=\"1\">window.__cmuxPreview={";

#[tokio::test]
async fn the_shim_is_the_first_thing_in_head() {
    let (edge, b) = setup().await;
    let r = raw(edge.http, &Edge::host(b, "v"), "GET", "/html", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let page = r.text();
    assert!(
        page.starts_with(&format!("<!doctype html><html><head>{SHIM_START}")),
        "{page}"
    );
    assert!(page.contains("</script><title>t</title></head>"));
    assert!(page.contains("\"label\":\"port-"), "config blob missing");
    assert_eq!(page.matches("data-cmux-shim").count(), 1);
    for h in ["content-length", "etag", "content-md5", "content-encoding"] {
        assert!(r.header(h).is_none(), "{h} kept after the body changed");
    }
}

#[tokio::test]
async fn without_head_the_shim_goes_before_the_first_element() {
    let (edge, b) = setup().await;
    let r = raw(
        edge.http,
        &Edge::host(b, "v"),
        "GET",
        "/html?nohead=1",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert!(
        r.text()
            .starts_with(&format!("<!doctype html><html>{SHIM_START}")),
        "{}",
        r.text()
    );
    assert!(r.text().contains("</script><body>"));
}

#[tokio::test]
async fn compressed_html_is_decoded_rewritten_and_sent_plain() {
    let (edge, b) = setup().await;
    for enc in ["gzip", "deflate", "br", "zstd"] {
        let r = raw(
            edge.http,
            &Edge::host(b, "v"),
            "GET",
            &format!("/html?enc={enc}"),
            &[],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{enc}");
        assert!(r.header("content-encoding").is_none(), "{enc}");
        let page = r.text();
        assert!(page.contains(SHIM_START), "{enc}: {page}");
        assert!(page.contains("<p id=\"x\">hello</p>"), "{enc}");
    }
}

#[tokio::test]
async fn unknown_encodings_and_other_types_pass_through_byte_for_byte() {
    let (edge, b) = setup().await;
    let r = raw(
        edge.http,
        &Edge::host(b, "v"),
        "GET",
        "/html?enc=compress",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.header("content-encoding"), Some("compress"));
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert!(!r.text().contains("data-cmux-shim"));
    let r = raw(
        edge.http,
        &Edge::host(b, "v"),
        "GET",
        "/html?ct=text/plain",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert!(!r.text().contains("data-cmux-shim"));
    assert!(r.header("content-length").is_some());
    // HTML content types are matched case-insensitively
    let r = raw(
        edge.http,
        &Edge::host(b, "v"),
        "GET",
        "/html?ct=TEXT/HTML",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert!(r.text().contains("data-cmux-shim"));
}

#[tokio::test]
async fn inject_shim_false_leaves_the_page_alone() {
    let (edge, _) = setup().await;
    let r = raw(edge.http, &Edge::host(39378, "v"), "GET", "/html", &[], b"")
        .await
        .unwrap();
    assert!(!r.text().contains("data-cmux-shim"));
    assert_eq!(r.header("etag"), Some("\"v1\""));
    let r = raw(
        edge.http,
        &Edge::host(39378, "v"),
        "GET",
        "/proxy-sw.js",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(
        r.json()["path"],
        "/proxy-sw.js",
        "the app's own path when the shim is off"
    );
}

#[tokio::test]
async fn proxy_sw_js_is_served_with_this_hosts_config() {
    let (edge, b) = setup().await;
    let host = format!("{}:{}", Edge::host(b, "v"), edge.http.port());
    let r = raw(edge.http, &host, "GET", "/proxy-sw.js", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/javascript; charset=utf-8")
    );
    let js = r.text();
    assert!(js.starts_with("self.__cmuxPreview={"), "{js}");
    assert!(js.contains(&format!("\"publicPort\":{}", edge.http.port())));
    assert!(
        js.contains("new Request(target, event.request)"),
        "the worker must keep method and body"
    );
}

#[tokio::test]
async fn a_50mb_page_streams_through_the_rewriter_with_flat_memory() {
    let (edge, b) = setup().await;
    // warm up, then take the peak so far as the baseline
    raw(
        edge.http,
        &Edge::host(b, "v"),
        "GET",
        "/html?size=100000",
        &[],
        b"",
    )
    .await
    .unwrap();
    let before = vm_hwm_kib(edge.child.id());
    let r = raw(
        edge.http,
        &Edge::host(b, "v"),
        "GET",
        "/html?size=52428800",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.len() > 50 * 1024 * 1024);
    assert!(r.text().ends_with("</body></html>"));
    let grown = vm_hwm_kib(edge.child.id()).saturating_sub(before);
    // A buffering proxy would grow by 50+ MiB; streaming stays within a few chunks.
    assert!(
        grown < 16 * 1024,
        "proxy peak memory grew by {grown} KiB for a 50 MiB page"
    );
}

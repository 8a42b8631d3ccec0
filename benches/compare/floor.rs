//! The pingora floor (issue 15): the least a pingora 0.9 proxy does per request. Its only
//! phase returns one fixed peer; one worker, no work stealing, the system allocator, pingora's
//! defaults everywhere else. `benches/compare` runs it beside cmux-edge so that every figure
//! splits into what pingora costs and what cmux-edge adds.
//!
//! usage: pingora_floor --http ADDR --upstream ADDR [--https ADDR --cert PEM --key PEM]

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::{http_proxy_service, HttpPeer, ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

struct Floor(SocketAddr);

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut http, mut upstream, mut https, mut cert, mut key) = (None, None, None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--http" => http = Some(value),
            "--upstream" => upstream = Some(value.parse::<SocketAddr>()?),
            "--https" => https = Some(value),
            "--cert" => cert = Some(value),
            "--key" => key = Some(value),
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let (Some(http), Some(upstream)) = (http, upstream) else {
        return Err(
            "usage: pingora_floor --http ADDR --upstream ADDR [--https ADDR --cert PEM --key PEM]"
                .into(),
        );
    };
    pingora::tls::install_default_crypto_provider();
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Floor(upstream));
    proxy.add_tcp(&http);
    if let (Some(addr), Some(cert), Some(key)) = (https, cert, key) {
        let mut tls = TlsSettings::intermediate(&cert, &key)?;
        tls.enable_h2();
        proxy.add_tls_with_settings(&addr, None, tls);
    }
    server.add_service(proxy);
    server.run_forever()
}

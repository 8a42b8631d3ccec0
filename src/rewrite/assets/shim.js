// cmux-edge preview shim v1. Injected at the start of <head> of HTML preview pages.
// A dev server inside a sandbox often hands the page absolute loopback URLs
// ("http://localhost:5173/api", "ws://127.0.0.1:24678/"). In the user's browser those point at
// the user's own machine. This shim rewrites them to the public preview URL of the same VM,
// port for port, for fetch, XMLHttpRequest, WebSocket, EventSource, window.open, anchors and
// forms, and registers /proxy-sw.js for everything else (images, scripts, CSS).
// Configuration comes from window.__cmuxPreview, written by the proxy just before this code:
// { label, portStart, portEnd, domain, publicPort }. It works for any domain and route pattern.
(function () {
  "use strict";
  var cfg = window.__cmuxPreview;
  if (!cfg || window.__cmuxShim) return;
  var LOOPBACK = /^(localhost|0\.0\.0\.0|127(?:\.\d{1,3}){3}|\[::1\])$/i;

  function previewHost(port) {
    return cfg.label.slice(0, cfg.portStart) + port + cfg.label.slice(cfg.portEnd) + "." +
      cfg.domain + (cfg.publicPort ? ":" + cfg.publicPort : "");
  }

  // Returns the preview URL for a loopback URL with an explicit port, else the input as is.
  function rewrite(input, socket) {
    var u;
    try { u = new URL(String(input), location.href); } catch (e) { return input; }
    if (!LOOPBACK.test(u.hostname) || !u.port) return input;
    var secure = location.protocol === "https:";
    var ws = socket || u.protocol === "ws:" || u.protocol === "wss:";
    var scheme = ws ? (secure ? "wss:" : "ws:") : (secure ? "https:" : "http:");
    return scheme + "//" + previewHost(u.port) + u.pathname + u.search + u.hash;
  }

  var nativeFetch = window.fetch;
  if (nativeFetch) {
    window.fetch = function (input, init) {
      if (typeof Request !== "undefined" && input instanceof Request) {
        var url = rewrite(input.url);
        // new Request(url, request) keeps method, headers, body and credentials.
        if (url !== input.url) input = new Request(url, input);
      } else {
        input = rewrite(input);
      }
      return nativeFetch.call(this, input, init);
    };
  }

  var nativeOpen = XMLHttpRequest.prototype.open;
  XMLHttpRequest.prototype.open = function (method, url) {
    var args = Array.prototype.slice.call(arguments);
    args[1] = rewrite(url);
    return nativeOpen.apply(this, args);
  };

  function wrapConstructor(name, socket) {
    var Native = window[name];
    if (!Native) return;
    var Wrapped = function (url, options) {
      var target = rewrite(url, socket);
      return arguments.length > 1 ? new Native(target, options) : new Native(target);
    };
    Wrapped.prototype = Native.prototype;
    ["CONNECTING", "OPEN", "CLOSING", "CLOSED"].forEach(function (k) {
      if (k in Native) Object.defineProperty(Wrapped, k, { value: Native[k] });
    });
    window[name] = Wrapped;
  }
  wrapConstructor("WebSocket", true);
  wrapConstructor("EventSource", false);

  var nativeWindowOpen = window.open;
  window.open = function (url) {
    var args = Array.prototype.slice.call(arguments);
    if (args.length) args[0] = rewrite(url);
    return nativeWindowOpen.apply(this, args);
  };

  // location.href = / assign / replace cannot be patched (the Location object is unforgeable),
  // but the Navigation API sees every navigation the page starts and can send it elsewhere.
  if (window.navigation && typeof window.navigation.addEventListener === "function") {
    window.navigation.addEventListener("navigate", function (e) {
      var from = e.destination && e.destination.url;
      var to = from && rewrite(from);
      if (to && to !== from && e.cancelable) {
        e.preventDefault();
        location.href = to;
      }
    });
  }
  // Older browsers: links and forms are rewritten as they are used.
  document.addEventListener("click", function (e) {
    var a = e.target && e.target.closest ? e.target.closest("a[href]") : null;
    if (a) { var to = rewrite(a.href); if (to !== a.href) a.href = to; }
  }, true);
  document.addEventListener("submit", function (e) {
    var f = e.target;
    if (f && f.action) { var to = rewrite(f.action); if (to !== f.action) f.action = to; }
  }, true);

  if ("serviceWorker" in navigator && window.isSecureContext) {
    navigator.serviceWorker.register("/proxy-sw.js", { scope: "/" }).catch(function () {});
  }
  window.__cmuxShim = { version: 1, rewrite: rewrite };
})();

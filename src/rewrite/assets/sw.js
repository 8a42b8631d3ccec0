// cmux-edge preview service worker v1, served at /proxy-sw.js on preview hosts.
// It sends requests for loopback URLs with an explicit port to the same VM's public preview URL,
// keeping the method, headers, body and credentials (the old worker turned POST into GET).
// A request body is read whole before it is sent on (a streamed one needs HTTP/2 in Chromium).
// self.__cmuxPreview is written by the proxy just before this code (see shim.js).
"use strict";
var cfg = self.__cmuxPreview;
var LOOPBACK = /^(localhost|0\.0\.0\.0|127(?:\.\d{1,3}){3}|\[::1\])$/i;

self.addEventListener("install", function () { self.skipWaiting(); });
self.addEventListener("activate", function (e) { e.waitUntil(self.clients.claim()); });

function previewUrl(u) {
  var host = cfg.label.slice(0, cfg.portStart) + u.port + cfg.label.slice(cfg.portEnd) + "." +
    cfg.domain + (cfg.publicPort ? ":" + cfg.publicPort : "");
  return self.location.protocol + "//" + host + u.pathname + u.search;
}

self.addEventListener("fetch", function (event) {
  var u;
  try { u = new URL(event.request.url); } catch (e) { return; }
  if (!cfg || !LOOPBACK.test(u.hostname) || !u.port) return;
  var target = previewUrl(u);
  if (event.request.mode === "navigate") {
    event.respondWith(Response.redirect(target, 302));
    return;
  }
  var r = event.request;
  if (r.method === "GET" || r.method === "HEAD") {
    event.respondWith(fetch(new Request(target, event.request)));
    return;
  }
  // new Request(target, r) would hand fetch the body as a stream, which Chromium refuses
  // without duplex: "half" and sends only over HTTP/2: read the body first, then send it.
  event.respondWith(r.arrayBuffer().then(function (body) {
    return fetch(target, {
      method: r.method, headers: r.headers, body: body, mode: r.mode,
      credentials: r.credentials, cache: r.cache, redirect: r.redirect,
      integrity: r.integrity, referrerPolicy: r.referrerPolicy
    });
  }));
});

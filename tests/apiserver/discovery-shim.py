#!/usr/bin/env python3
"""A loopback TLS front of the CRD API server for kubectl (test infrastructure only).

kubectl builds its REST mapping from discovery: the core group (`/api`) and the group list
(`/apis`), both of which a kube-apiserver serves and apiextensions-apiserver does not (404), so
`kubectl apply` and `kubectl get` give up ("couldn't get current server API group list"). This
front answers `/api` with an empty version list and `/apis` with the groups the server does
serve (apiextensions.k8s.io and each CRD's group, read from the CRDs on every request), and
passes every other request, with its headers (kubectl prints the server's `Warning` headers), to
the server, authenticating with the admin certificate. Each group's own discovery
(`/apis/<group>/<version>`) is the server's.

    discovery-shim.py LISTEN_PORT UPSTREAM_PORT PKI_DIR
"""
import http.client
import http.server
import json
import ssl
import sys

LISTEN, UPSTREAM, PKI = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-authorization", "proxy-authenticate", "host", "content-length"}

upstream_ctx = ssl.create_default_context(cafile=f"{PKI}/ca.crt")
upstream_ctx.load_cert_chain(f"{PKI}/admin.crt", f"{PKI}/admin.key")


def upstream(method, path, body=None, headers=None):
    conn = http.client.HTTPSConnection("127.0.0.1", UPSTREAM, context=upstream_ctx, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def group(name, versions):
    gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": gvs, "preferredVersion": gvs[0]}


def group_list():
    groups = {"apiextensions.k8s.io": ["v1"]}
    status, _, data = upstream("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
    if status == 200:
        for crd in json.loads(data).get("items", []):
            spec = crd["spec"]
            served = [v["name"] for v in spec["versions"] if v.get("served")]
            if served:
                groups.setdefault(spec["group"], [])
                groups[spec["group"]] += [v for v in served if v not in groups[spec["group"]]]
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [group(n, vs) for n, vs in groups.items()]}


class Front(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, headers, body):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        path = self.path.split("?", 1)[0]
        if path == "/api":
            self.reply(200, [("Content-Type", "application/json")],
                       json.dumps({"kind": "APIVersions", "versions": [],
                                   "serverAddressByClientCIDRs": []}).encode())
            return
        if path.startswith("/api/"):
            self.reply(404, [("Content-Type", "application/json")],
                       json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "NotFound", "code": 404,
                                   "message": "no core API on this server"}).encode())
            return
        if path == "/apis":
            self.reply(200, [("Content-Type", "application/json")],
                       json.dumps(group_list()).encode())
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        status, resp_headers, data = upstream(self.command, self.path, body, headers)
        self.reply(status, resp_headers, data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any


server = http.server.ThreadingHTTPServer(("127.0.0.1", LISTEN), Front)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=f"{PKI}/ca.crt")
ctx.load_cert_chain(f"{PKI}/serving.crt", f"{PKI}/serving.key")
ctx.verify_mode = ssl.CERT_REQUIRED
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()

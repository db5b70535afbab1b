"""A local HTTP server laid out like the Hugging Face Hub's smollm-corpus dataset repo, for prepare.py's download
paths without network: repo info, the tree API, and resolve/ downloads with HTTP Range support.

    python tests/fake_hub.py DIR [--port 8000]     # serve DIR/<subset>/train-*.parquet
    HF_ENDPOINT=http://127.0.0.1:8000 ./run.sh smoke

The tests use FakeHub through conftest.py's fake_hub fixture; run as a script it prints the bytes it served per file
when stopped (Ctrl-C).
"""
import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeHub(BaseHTTPRequestHandler):
    """Serves a local dir under the hub's URL scheme: repo info, the tree API and resolve/ downloads with Range
    support (bytes=START- and bytes=START-END), counting the body bytes served per file in `served`. While
    hold_when() is true, file requests wait (and `holding` is set), so a test can kill a client mid-read."""
    root, commit, requests, cut_first_get, served = None, "a" * 40, [], set(), {}
    hold_when, holding = None, threading.Event()

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.serve(body=True)

    def do_HEAD(self):
        self.serve(body=False)

    def serve(self, body):
        FakeHub.requests.append((self.command, self.path, self.headers.get("Range")))
        path = self.path.split("?")[0]
        repo = "/api/datasets/HuggingFaceTB/smollm-corpus/revision/"
        tree = "/api/datasets/HuggingFaceTB/smollm-corpus/tree/"
        resolve = "/datasets/HuggingFaceTB/smollm-corpus/resolve/"
        if path.startswith(repo):
            data = json.dumps({"id": "HuggingFaceTB/smollm-corpus", "sha": self.commit, "private": False}).encode()
            return self.reply(200, data, {"Content-Type": "application/json"}, body)
        if path.startswith(tree):
            subset = path[len(tree):].split("/", 1)[1]
            files = sorted((self.root / subset).glob("*.parquet"))
            data = json.dumps([{"type": "file", "path": f"{subset}/{f.name}", "size": f.stat().st_size,
                                "oid": "0" * 40} for f in files]).encode()
            return self.reply(200, data, {"Content-Type": "application/json"}, body)
        if path.startswith(resolve):
            rel = path[len(resolve):].split("/", 1)[1]
            while FakeHub.hold_when and FakeHub.hold_when():
                FakeHub.holding.set()
                time.sleep(0.01)
            f = self.root / rel
            if not f.exists():
                return self.reply(404, b"not found", {"X-Error-Code": "EntryNotFound"}, body)
            data = f.read_bytes()
            headers = {"X-Repo-Commit": self.commit, "ETag": f'"{hash(data) & 0xffffffff:08x}"',
                       "Accept-Ranges": "bytes"}
            if body and rel in self.cut_first_get:  # drop the connection halfway through the first download
                FakeHub.cut_first_get.discard(rel)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            start, end = 0, len(data) - 1
            if self.headers.get("Range"):
                first, last = self.headers["Range"].split("=")[1].split("-")
                start, end = int(first), min(int(last), end) if last else end
            ranged = (start, end) != (0, len(data) - 1)
            if ranged:
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            if body:
                FakeHub.served[rel] = FakeHub.served.get(rel, 0) + end + 1 - start
            return self.reply(206 if ranged else 200, data[start:end + 1], headers, body)
        self.reply(404, b"", {}, body)

    def reply(self, code, data, headers, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)


def start(root, port=0):
    """Start FakeHub over root in a daemon thread -> (server, endpoint URL)."""
    FakeHub.root, FakeHub.requests, FakeHub.served, FakeHub.hold_when = Path(root), [], {}, None
    FakeHub.cut_first_get = set()
    FakeHub.holding.clear()
    server = ThreadingHTTPServer(("127.0.0.1", port), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="a dir laid out like the hub repo: ROOT/<subset>/train-NNNNN-of-MMMMM.parquet")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    server, endpoint = start(args.root, args.port)
    print(f"serving {args.root} as the hub at {endpoint} (HF_ENDPOINT={endpoint}); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        for rel, n in sorted(FakeHub.served.items()):
            print(f"{rel}: {n:,} bytes served of {(Path(args.root) / rel).stat().st_size:,}")

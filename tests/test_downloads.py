"""Downloads that resume (atss_jax.data.downloads), against a local HTTP server that honours range requests
and can drop a connection part way, as a flaky link does."""

import http.server
import threading

import pytest
import tensorflow_datasets as tfds

from atss_jax.data import downloads

PAYLOAD = bytes(range(256)) * 4000  # 1,024,000 bytes


class _Server(http.server.ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ranges = []  # the Range header of each request (None: none)
        self.drop_after = None  # bytes of the body sent before the next response is cut off
        self.honour_ranges = True


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.ranges.append(self.headers.get("Range"))
        start = 0
        if server.honour_ranges and self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        body = PAYLOAD[start:]
        if server.drop_after is not None:
            body, server.drop_after = body[:server.drop_after], None
            self.wfile.write(body)
            self.wfile.flush()
            self.connection.shutdown(2)  # the link drops mid-body
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def _url(server):
    return f"http://127.0.0.1:{server.server_address[1]}/zips/val2017.zip"


def test_a_dropped_connection_resumes_where_it_stopped(server, tmp_path):
    server.drop_after = 300_000
    path = downloads.fetch(_url(server), tmp_path, len(PAYLOAD), retry_wait_s=0)
    assert path == tmp_path / "val2017.zip" and path.read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=0-", "bytes=300000-"]
    assert not (tmp_path / "val2017.zip.part").exists()


def test_a_partial_file_of_an_earlier_run_is_resumed_and_a_finished_one_kept(server, tmp_path):
    (tmp_path / "val2017.zip.part").write_bytes(PAYLOAD[:123_456])
    downloads.fetch(_url(server), tmp_path, len(PAYLOAD), retry_wait_s=0)
    assert server.ranges == ["bytes=123456-"] and (tmp_path / "val2017.zip").read_bytes() == PAYLOAD
    downloads.fetch(_url(server), tmp_path, len(PAYLOAD), retry_wait_s=0)
    assert len(server.ranges) == 1, "a finished file is not downloaded again"


def test_a_server_without_ranges_restarts_the_file(server, tmp_path):
    server.honour_ranges = False
    (tmp_path / "val2017.zip.part").write_bytes(b"x" * 1000)
    downloads.fetch(_url(server), tmp_path, len(PAYLOAD), retry_wait_s=0)
    assert (tmp_path / "val2017.zip").read_bytes() == PAYLOAD


def test_a_link_that_never_comes_back_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "RETRIES", 2)
    with pytest.raises(downloads.DownloadError, match=r"3 failed requests in a row.*Run the same command again"):
        downloads.fetch("http://127.0.0.1:9/zips/val2017.zip", tmp_path, 10, retry_wait_s=0)
    with pytest.raises(ValueError, match="must be a local folder"):
        downloads.fetch_all({}, "gs://bucket/zips")


def test_coco_2017_archives_are_the_five_of_its_splits(tmp_path):
    archives = downloads.tfds_archives(tfds.builder("coco/2017", data_dir=str(tmp_path)))
    assert sorted(url.rsplit("/", 1)[1] for url in archives) == [
        "annotations_trainval2017.zip", "image_info_test2017.zip", "test2017.zip", "train2017.zip", "val2017.zip"]
    assert archives["http://images.cocodataset.org/zips/val2017.zip"] == 815_585_330  # COCO's published size

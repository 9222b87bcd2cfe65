"""Object stores: a writer SIGKILLed mid-upload, and each request of a save failing in turn (S3 API, moto).

The remote protocol (``ckptfn.io.remote``) promises what the local one does: every
name holds a complete snapshot, the old or the new one, and the state a shell
keeps is the one the bucket holds. This module checks it against a real S3 API:
moto's server, started here on 127.0.0.1 (nothing leaves the machine).

Kills. A writer process (forked from a server that has imported torch and
ckptfn) restores its state from the bucket and saves the next epoch under three
names (``best_loss.pt``, ``best_corr.pt`` with ``overwrite=False`` so every save
archives the previous version, ``last.pt``). The driver SIGKILLs it during the
upload: for a single PUT (8-40 MiB) at a random moment of the PUT's duration
(learned from the uncut first save of the run), for a multipart upload (104-120
MiB, parts of 50 MiB) once a random number of bytes has reached the store (its
parts listed as they arrive). Each kill's writer resumes from what the previous
one left; the run's last, uncut save must also abort the uploads the killed
writers abandoned.

Request faults. Every call a save makes through the ``ObjectStore`` seam (size,
listing, archive copy, upload, server-side copies, removals) is failed in turn
(``ConnectionResetError``), for every epoch of a history that exercises archives
with ``keep``, top-k members and a periodic name; each trial starts from a fresh
replay of the epochs before. The write must fail with ``CheckpointWriteError`` (or,
for a removal, warn and succeed) and the state ``kit.state_to_keep`` keeps must
equal ``restore_from_directory`` of the bucket.

After every kill and every fault: each object under a ckptfn name loads
(``load_checkpoint``) and holds one consistent snapshot; each name the bucket held
before holds its old object or the new snapshot (never gone: "data lost"); no
archived version disappears unless its removal was planned; every best the
bucket restores is the files' own and was committed or in flight; no best gets
worse.

    python tests/reliability/objectstore.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import random
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping

if __name__ == "__main__":  # run as a script: make `tests` importable, then run the module proper
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from tests.reliability.objectstore import main

    sys.exit(main())

import torch

import ckptfn
from ckptfn import CheckpointError, CheckpointWriteError, kit
from ckptfn.core.metadata import entry_for
from ckptfn.core.naming import archived_of
from ckptfn.io.objectstore import ObjectStore, store_for

from tests.reliability.common import Tally, Unavailable, clock, forkserver, owner_of

SECTION = "fault"
KILLS = "SIGKILL of an S3 writer (moto)"
MID_PUT = "  of which mid single PUT"
MID_MULTIPART = "  of which mid multipart upload"
FAULTS = "a failing S3 request (each of a save's in turn)"

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
KEY_BUFFER = "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"
DEFAULT_PART = 50 << 20  # s3fs's part size: a file of twice that or more is uploaded in parts
MIB = 1 << 20

KILL_CONFIG = ckptfn.Config([
    ckptfn.Strategy("val_loss", filename="best_loss.pt"),
    ckptfn.Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False),
    ckptfn.Every(filename="last.pt"),
])
FAULT_CONFIG = ckptfn.Config([
    ckptfn.Strategy("val_loss", filename="best_loss.pt"),
    ckptfn.Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False, keep=2),
    ckptfn.Strategy("acc", mode="max", filename="best_acc.pt", top_k=2),
    ckptfn.Every(filename="last.pt"),
])
#: (val_loss, val_corr, acc) per epoch: archives and their pruning (keep=2), top-k entries, set-asides and exits.
FAULT_HISTORY = [(0.5, 0.1, 0.50), (0.4, 0.2, 0.45), (0.45, 0.3, 0.60), (0.3, 0.25, 0.55), (0.35, 0.4, 0.58)]


def kill_metrics(epoch: int) -> dict:
    """Every epoch improves both metric strategies (every name moves, best_corr.pt archives)."""
    return {"val_loss": 1.0 / (epoch + 1), "val_corr": float(epoch)}


def fault_metrics(epoch: int) -> dict:
    loss, corr, acc = FAULT_HISTORY[epoch]
    return {"val_loss": loss, "val_corr": corr, "acc": acc}


def _conf(endpoint: str, **options) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing", **options}


# --- the server ----------------------------------------------------------------------------


class Requests:
    """The server's WSGI application, counting the requests it is handling: a request a killed
    writer had sent in full is still completed by the server (S3's too), after the writer died."""

    def __init__(self, app) -> None:
        self.app, self.active, self.lock = app, 0, threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            self.active += 1
        try:  # moto reads the body and stores the object before it returns
            return self.app(environ, start_response)
        finally:
            with self.lock:
                self.active -= 1

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until the server handles no request (so a check never races a dead writer's last PUT)."""
        time.sleep(0.05)  # a request whose headers were in flight reaches the application
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.005)


@dataclasses.dataclass(frozen=True)
class Server:
    endpoint: str
    requests: Requests


@contextlib.contextmanager
def s3_server() -> Iterator[Server]:
    """moto's S3 server on 127.0.0.1 (an OS-chosen port) with fsspec's ``s3`` configuration
    pointing at it; its endpoint URL and request count. Both are put back as they were
    afterwards. Raises ``Unavailable`` without moto[server] or s3fs."""
    try:
        import fsspec
        import s3fs  # noqa: F401 - the store's package
        from moto.server import ThreadedMotoServer
    except ImportError as error:
        raise Unavailable(f"needs moto[server] and s3fs (pip install 'ckptfn[test]'): {error}") from None
    for name, value in CREDENTIALS.items():
        os.environ.setdefault(name, value)
    buffered = os.environ.get(KEY_BUFFER)
    os.environ[KEY_BUFFER] = str(1 << 30)  # objects in memory: moto reads a whole object for every range
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    previous = fsspec.config.conf.get("s3")
    try:
        host, port = server._server.server_address  # (moto keeps its werkzeug server there)
        endpoint = f"http://{host}:{port}"
        requests = server._server.app = Requests(server._server.app)  # werkzeug looks it up per request
        fsspec.config.conf["s3"] = _conf(endpoint)
        yield Server(endpoint, requests)
    finally:
        if previous is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = previous
        server.stop()
        werkzeug.setLevel(level)
        if buffered is None:
            os.environ.pop(KEY_BUFFER, None)
        else:
            os.environ[KEY_BUFFER] = buffered


_BUCKETS = iter(range(1 << 30))


def new_bucket() -> str:
    """A fresh bucket's ``s3://<bucket>/run`` URL."""
    bucket = f"ckptfn-reliability-{os.getpid()}-{next(_BUCKETS)}"
    store, _ = store_for(f"s3://{bucket}")
    store.fs.mkdir(bucket)
    return f"s3://{bucket}/run"


def drop_bucket(url: str) -> None:
    """Remove the bucket of ``url`` with everything in it (incomplete uploads too)."""
    store, key = store_for(url)
    bucket = key.split("/", 1)[0]
    for upload in store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []):
        store.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    with contextlib.suppress(FileNotFoundError):
        store.fs.rm(bucket, recursive=True)


def uploads_in_flight(url: str) -> list[dict]:
    """The incomplete multipart uploads under ``url``."""
    store, key = store_for(url)
    bucket, _, prefix = key.partition("/")
    return store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/").get("Uploads", [])


def bytes_uploaded(url: str, upload: Mapping) -> int:
    """The bytes of the parts of ``upload`` the store holds."""
    store, key = store_for(url)
    bucket = key.split("/", 1)[0]
    parts = store.fs.call_s3("list_parts", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return sum(part["Size"] for part in parts.get("Parts", []))


# --- what a bucket directory holds -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Held:
    """One object: its ETag, the epoch of the snapshot it holds (None: does not load), why not."""

    name: str
    etag: str
    epoch: int | None
    metadata: Mapping | None
    problem: str | None


def payload_problem(payload: object, metadata: Mapping) -> str | None:
    """Why a loaded object is not one consistent snapshot (None when it is)."""
    try:
        epoch = payload["epoch"]
        if epoch != metadata.get("epoch"):
            return f"payload epoch {epoch}, metadata epoch {metadata.get('epoch')}"
        weights = payload["w"]
        if weights.numel() and not (weights[0].item() == weights[-1].item() == float(epoch)):
            return f"the weights do not carry epoch {epoch}"
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        return f"unexpected payload ({error!r})"
    return None


def look(url: str, config: ckptfn.Config, *, known: Mapping[str, Held] | None = None) -> dict[str, Held]:
    """Every object of the directory ``url``, loaded with ``load_checkpoint`` and its payload checked;
    an object whose ETag one of ``known`` has is that one (the same bytes: not downloaded again)."""
    store, root = store_for(url)
    by_etag = {held.etag: held for held in (known or {}).values() if held.etag}
    found = {}
    for name in store.names(root):
        info = store.fs.info(f"{root}/{name}")
        etag = str(info.get("ETag") or info.get("etag") or "")
        if etag in by_etag:
            found[name] = dataclasses.replace(by_etag[etag], name=name)
            continue
        if owner_of(name, config) is None:
            found[name] = Held(name, etag, None, None, "an object under a name ckptfn never uses")
            continue
        try:
            payload, metadata = ckptfn.load_checkpoint(f"{url}/{name}")
            problem = payload_problem(payload, metadata)
        except CheckpointError as error:
            found[name] = Held(name, etag, None, None, f"does not load: {error}")
            continue
        found[name] = Held(name, etag, metadata.get("epoch"), metadata, problem)
    return found


def file_values(held: Mapping[str, Held], config: ckptfn.Config) -> dict[str, float | None]:
    """filename -> the value its object records for its own strategy (None when absent)."""
    values = {}
    for strategy in config.strategies:
        if not hasattr(strategy, "metric_name"):
            continue
        holding = held.get(strategy.filename)
        entry = entry_for(holding.metadata, strategy.filename) if holding and holding.metadata else None
        values[strategy.filename] = entry["value"] if entry else None
    return values


def _keeps_versions(strategy) -> bool:
    return getattr(strategy, "overwrite", True) is False or getattr(strategy, "top_k", 1) > 1


def versions(held: Mapping[str, Held], config: ckptfn.Config) -> set[tuple[str, int]]:
    """The (strategy file, epoch) of every version the directory keeps: the names, archived
    versions and top-k members of the strategies that keep versions (``overwrite=False``, top-k)."""
    keeping = {s.filename for s in config.strategies if _keeps_versions(s)}
    return {(owner_of(name, config), h.epoch) for name, h in held.items()
            if h.epoch is not None and owner_of(name, config) in keeping}


def identities(held: Mapping[str, Held], names, config: ckptfn.Config) -> set[tuple[str, int | None]]:
    """``(name, epoch)`` of each of ``names``; an archive's name (its time stamp differs from run to
    run) as ``archive of <file>``."""
    found = set()
    for name in names:
        owner = owner_of(name, config)
        shown = f"archive of {owner}" if owner and archived_of(name, owner) else name
        found.add((shown, held[name].epoch))
    return found


@contextlib.contextmanager
def ckptfn_log_kept() -> Iterator[list[logging.LogRecord]]:
    """The ``ckptfn`` logger's records (the warnings of failed removals) collected, not printed."""
    logger = logging.getLogger("ckptfn")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, propagate = Keep(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def restored_values(config: ckptfn.Config, url: str) -> dict:
    """``restore_from_directory``'s bests; warnings are errors (no object may be unreadable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ckptfn.best_values(ckptfn.restore_from_directory(config, url))


def better(mode: str, a: float, b: float) -> bool:
    return a < b if mode == "min" else a > b


# --- kills --------------------------------------------------------------------------------


class LoggingStore(ObjectStore):
    """The real store, saying when its upload begins and ends (the writer's log); with
    ``part_size``, a multipart upload has parts of that size (s3fs's own are 50 MiB)."""

    def __init__(self, fs, protocol: str, say, part_size: int | None = None) -> None:
        super().__init__(fs, protocol)
        self.say, self.part_size = say, part_size

    def upload(self, local, path):
        self.say(event="upload", size=os.path.getsize(local))
        if self.part_size is None:
            super().upload(local, path)
        else:  # the same s3fs call, smaller parts
            self.fs.put_file(os.fspath(local), path, chunksize=self.part_size)
        self.say(event="uploaded")


def writer(endpoint: str, url: str, epoch: int, elements: int, part_size: int | None, log_path: str) -> None:
    """The writer process: restore from the bucket, save epoch ``epoch``, log each step."""
    import fsspec

    os.environ.update(CREDENTIALS)
    fsspec.config.conf["s3"] = _conf(endpoint, max_concurrency=1)  # the parts one by one: kills between them
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def say(**record) -> None:  # one write per line: a kill never leaves half a record
        os.write(log, (json.dumps({"time": time.monotonic(), **record}) + "\n").encode())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = kit.restore_from_directory(KILL_CONFIG, url)
        say(event="start", bests=ckptfn.best_values(state))
        metrics = kill_metrics(epoch)
        new, actions = ckptfn.step(state, metrics, epoch)
        snapshot = kit.plan(kit.partition(actions)[0], state=new, metrics=metrics)
        payload = {"w": torch.full((elements,), float(epoch)), "epoch": epoch}
        store, _ = store_for(url)
        written = kit.write(url, snapshot, payload, fs=LoggingStore(store.fs, "s3", say, part_size))
        kept = kit.state_to_keep(KILL_CONFIG, url, state, new, written)
    say(event="done", error=None if written.error is None else repr(written.error), bests=ckptfn.best_values(kept))


def _records(log_path: pathlib.Path) -> list[dict]:
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def _wait(process, log_path: pathlib.Path, event: str, timeout: float) -> dict | None:
    """Poll the writer's log until ``event`` appears (the record) or the writer ends (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.is_alive():
        for record in _records(log_path):
            if record["event"] == event:
                return record
        time.sleep(0.002)
    return next((r for r in _records(log_path) if r["event"] == event), None)


@dataclasses.dataclass(frozen=True)
class KillPlan:
    """Runs of ``kills`` kills each, of payloads of ``mib`` MiB uploaded in parts of ``part_mib``
    (None: s3fs's 50 MiB, so a single PUT below 100 MiB)."""

    runs: int
    kills: int
    mib: tuple[float, float]
    part_mib: float | None = None


#: The kills of the report: single PUTs, multipart uploads in small parts (a kill between any
#: two), and multipart uploads as ckptfn makes them (s3fs's 50 MiB parts).
FULL_KILLS = (KillPlan(2, 4, (4, 24)), KillPlan(2, 3, (16, 40), part_mib=5), KillPlan(1, 2, (104, 112)))
QUICK_KILLS = (KillPlan(1, 2, (4, 8)), KillPlan(1, 2, (16, 24), part_mib=5))


def _sleep_until(log_path: pathlib.Path, event: str, seconds: float) -> None:
    """Sleep ``seconds``, or less once the writer logs ``event`` (a learned upload time too long
    must not let the writer finish its save before the kill)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(r["event"] == event for r in _records(log_path)):
            return
        time.sleep(0.001)


class KillRun:
    """One bucket directory, one payload size; a writer killed again and again, each resuming."""

    def __init__(self, tally: Tally, server: Server, work: pathlib.Path, elements: int, part_size: int | None,
                 rng: random.Random) -> None:
        self.tally, self.server, self.work, self.elements, self.rng = tally, server, work, elements, rng
        self.part_size = part_size
        self.url = new_bucket()
        self.epoch = 0
        self.held: dict[str, Held] = {}
        self.values: dict[str, float | None] = {}
        self.upload_time: float | None = None
        self.kill_bytes: list[tuple[int, int]] = []  # (bytes the store held at the kill, object size)
        self.kill_moments: list[float] = []  # the kill's moment as a share of the PUT's duration

    def problem(self, category: str, message: str) -> None:
        self.tally.problem(SECTION, KILLS, category, f"{self.url}: {message}")

    def log_path(self) -> pathlib.Path:
        """A new writer's log: a name no earlier writer used."""
        return self.work / f"{self.url.split('://', 1)[1].replace('/', '-')}-epoch{self.epoch}.jsonl"

    def _start(self, log_path: pathlib.Path):
        args = (self.server.endpoint, self.url, self.epoch, self.elements, self.part_size, str(log_path))
        process = forkserver().Process(target=writer, args=args)
        process.start()
        return process

    def clean_save(self, where: str) -> None:
        """An uncut save by a (restarted) writer; learns how long its upload takes."""
        log_path = self.log_path()
        process = self._start(log_path)
        process.join(timeout=300)
        records = _records(log_path)
        done = next((r for r in records if r["event"] == "done"), None)
        if process.exitcode != 0 or done is None or done["error"]:
            self.problem("unexpected", f"{where}: the writer failed (exit {process.exitcode}): {done and done['error']}")
            return
        self.learn(records)
        self.check(records, where, killed=False)
        self.epoch += 1

    def learn(self, records: list[dict]) -> None:
        """The shortest upload seen so far (the first writer's first one is often slower): a kill
        at a share of it lands inside the next upload."""
        times = {r["event"]: r["time"] for r in records}
        if "upload" in times and "uploaded" in times:
            seen = max(times["uploaded"] - times["upload"], 0.002)
            self.upload_time = seen if self.upload_time is None else min(self.upload_time, seen)

    def killed_save(self, where: str) -> None:
        """A writer killed during its upload: at a random moment of a single PUT, or once a random
        number of bytes of a multipart upload has reached the store."""
        log_path = self.log_path()
        process = self._start(log_path)
        began = _wait(process, log_path, "upload", timeout=120)
        size = began["size"] if began else 0
        part = self.part_size or DEFAULT_PART
        multipart = size >= 2 * part
        upload_time = self.upload_time or 0.05
        if multipart:  # once k of its n parts are in the store (k < n), early in the next one
            parts = -(-size // part)
            target = self.rng.randrange(parts) * part
            deadline = time.monotonic() + 60
            while process.is_alive() and time.monotonic() < deadline:
                uploads = uploads_in_flight(self.url)
                if uploads and bytes_uploaded(self.url, uploads[0]) >= target:
                    break
                time.sleep(0.002)
            _sleep_until(log_path, "uploaded", self.rng.uniform(0, 0.3 * upload_time / parts))
        elif began is not None:  # once the PUT has reached the server, a random moment of its duration
            deadline = time.monotonic() + 10
            while process.is_alive() and not self.server.requests.active and time.monotonic() < deadline:
                time.sleep(0.0005)
            share = self.rng.uniform(0, 0.9)
            _sleep_until(log_path, "uploaded", share * upload_time)
            self.kill_moments.append(share)
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the writer had already ended (it failed: the log says why)
            pass
        process.join(timeout=60)
        self.server.requests.settle()
        records = _records(log_path)
        if process.exitcode != -signal.SIGKILL:
            done = next((r for r in records if r["event"] == "done"), None)
            self.problem("unexpected", f"{where}: the writer ended before the kill (exit {process.exitcode}, "
                                       f"{done and done['error']})")
        self.tally.tried(SECTION, KILLS)
        self.learn(records)
        landed = began is not None and not any(r["event"] == "uploaded" for r in records)
        if landed and multipart:
            in_flight = uploads_in_flight(self.url)
            if in_flight:
                self.tally.tried(SECTION, MID_MULTIPART)
                self.kill_bytes.append((bytes_uploaded(self.url, in_flight[0]), size))
        elif landed:
            self.tally.tried(SECTION, MID_PUT)
        self.check(records, where, killed=True)
        self.epoch += 1

    def check(self, records: list[dict], where: str, *, killed: bool) -> None:
        """Every name old or new and complete; the bucket's bests the files' and committed or in flight."""
        before = self.held
        after = look(self.url, KILL_CONFIG, known=before)
        for name in before:
            if name not in after:
                self.problem("lost", f"{where}: {name} is gone")
        for name, held in after.items():
            if held.problem:
                self.problem("corruption", f"{where}: {name}: {held.problem}")
            elif name in before and held.etag != before[name].etag and held.epoch != self.epoch:
                self.problem("corruption", f"{where}: {name} holds epoch {held.epoch}, neither "
                                           f"{before[name].epoch} (old) nor {self.epoch} (new)")
        lost = versions(before, KILL_CONFIG) - versions(after, KILL_CONFIG)  # archives are never pruned here
        if lost:
            self.problem("lost", f"{where}: versions gone: {sorted(lost)}")
        self.held = after
        try:
            restored = restored_values(KILL_CONFIG, self.url)
        except Exception as error:  # noqa: BLE001
            self.problem("unexpected", f"{where}: restore failed: {type(error).__name__}: {error}")
            return
        on_file = file_values(after, KILL_CONFIG)
        if restored != on_file:
            self.problem("lost", f"{where}: restored {restored}, the objects hold {on_file}")
        in_flight = kill_metrics(self.epoch)
        for strategy in KILL_CONFIG.strategies:
            if not hasattr(strategy, "metric_name"):
                continue
            old, new = self.values.get(strategy.filename), restored.get(strategy.filename)
            if new not in (old, in_flight[strategy.metric_name]):
                self.problem("lost", f"{where}: {strategy.filename} holds {new}, the writer had {old} "
                                     f"or was writing {in_flight[strategy.metric_name]}")
            if old is not None and (new is None or better(strategy.mode, old, new)):
                self.problem("lost", f"{where}: {strategy.filename} went from {old} to {new}")
        done = next((r for r in records if r["event"] == "done"), None)
        if not killed and done is not None and done["bests"] != restored:
            self.problem("lost", f"{where}: the writer kept {done['bests']}, the bucket restores {restored}")
        self.values = restored

    def finish(self, where: str) -> None:
        """A last, uncut save by a restarted writer: it saves over what the kills left and aborts
        the uploads the killed writers abandoned (moto dates every upload in 2010: an hour old)."""
        self.clean_save(where)
        left = uploads_in_flight(self.url)
        if left:
            self.problem("unexpected", f"{where}: {len(left)} abandoned multipart uploads not aborted")
        drop_bucket(self.url)


def kills(tally: Tally, server: Server, plans=FULL_KILLS, *, seed: int = 0) -> dict[str, list]:
    """The kills of ``plans`` (``KillPlan``); where they landed: the moments of the PUTs cut (shares
    of their duration) and the (bytes in the store, size) of the multipart uploads cut."""
    rng = random.Random(seed)
    tally.tried(SECTION, KILLS, 0)  # (the rows in this order)
    tally.tried(SECTION, MID_PUT, 0)
    tally.tried(SECTION, MID_MULTIPART, 0)
    seen: dict[str, list] = {"bytes": [], "moments": []}
    with tempfile.TemporaryDirectory(prefix="ckptfn-s3-kill-") as work:
        for plan in plans:
            for _ in range(plan.runs):
                mib = rng.uniform(*plan.mib)
                part = None if plan.part_mib is None else int(plan.part_mib * MIB)
                run = KillRun(tally, server, pathlib.Path(work), int(mib * MIB) // 4, part, rng)
                try:
                    run.clean_save("first save")
                    for kill in range(plan.kills):
                        run.killed_save(f"kill {kill} (epoch {run.epoch}, {mib:.0f} MiB)")
                    run.finish("last save")
                finally:
                    with contextlib.suppress(Exception):
                        drop_bucket(run.url)
                seen["bytes"] += run.kill_bytes
                seen["moments"] += run.kill_moments
    return seen


# --- request faults ------------------------------------------------------------------------


class Injected(ConnectionResetError):
    """The failure injected into one store request."""


#: The ObjectStore calls a save can make (every one can fail).
CALLS = ("size", "modified", "names", "reader", "read", "read_ranges", "upload", "put_bytes", "copy", "remove",
         "abort_abandoned_uploads")


class FaultyStore(ObjectStore):
    """The real store, recording each call; the ``fail_at``-th call (0-based) raises ``Injected``."""

    def __init__(self, fs, protocol: str, fail_at: int | None = None) -> None:
        super().__init__(fs, protocol)
        self.calls: list[str] = []
        self.fail_at = fail_at


def _wrapped(name: str):
    original = getattr(ObjectStore, name)

    def call(self, *args, **kwargs):
        self.calls.append(name)
        if self.fail_at is not None and len(self.calls) - 1 == self.fail_at:
            raise Injected(f"the connection was reset during {name} (injected)")
        return original(self, *args, **kwargs)

    call.__name__ = name
    return call


for _name in CALLS:
    setattr(FaultyStore, _name, _wrapped(_name))


def _save(url: str, state, epoch: int, store: ObjectStore | None = None):
    """One epoch of FAULT_HISTORY through the kit, as a shell runs it: (kept state, written)."""
    metrics = fault_metrics(epoch)
    new, actions = ckptfn.step(state, metrics, epoch)
    saves = kit.partition(actions)[0]
    if not saves:
        return new, None
    snapshot = kit.plan(saves, state=new, metrics=metrics, now=clock(epoch))
    payload = {"w": torch.full((64,), float(epoch)), "epoch": epoch}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = kit.write(url, snapshot, payload, fs=store)
        kept = kit.state_to_keep(FAULT_CONFIG, url, state, new, written)
    return kept, written


def _replayed(epochs: int):
    """A fresh bucket directory holding the clean saves of the first ``epochs`` epochs; (url, state)."""
    url = new_bucket()
    state = ckptfn.init(FAULT_CONFIG)
    for epoch in range(epochs):
        state, written = _save(url, state, epoch)
        if written is not None:
            written.raise_error()
    return url, state


def _timestamps(held: Mapping[str, Held]) -> dict[str, object]:
    return {name: (h.metadata or {}).get("timestamp") for name, h in held.items()}


def fault_trial(tally: Tally, epoch: int, fail_at: int, clean: Mapping[str, set], known: Mapping[str, Held],
                where: str) -> int:
    """Epoch ``epoch``'s save with its ``fail_at``-th store call failing; the checks. Returns how many
    archive (or top-k) copies of a still-current object the failure left (the protocol keeps the
    copy when it cannot tell whether the failed request landed: a duplicate, never a loss)."""
    duplicates = 0
    url, state = _replayed(epoch)
    try:
        before = look(url, FAULT_CONFIG, known=known)
        store, _ = store_for(url)
        failing = FaultyStore(store.fs, "s3", fail_at)
        try:
            kept, written = _save(url, state, epoch, failing)
        except Exception as error:  # noqa: BLE001 - write never raises: anything here is unexpected
            tally.problem(SECTION, FAULTS, "unexpected", f"{where}: {type(error).__name__}: {error}")
            return duplicates
        tally.tried(SECTION, FAULTS)
        failed_call = failing.calls[fail_at] if fail_at < len(failing.calls) else None
        error = written.error
        if error is not None and not isinstance(error, CheckpointWriteError):
            tally.problem(SECTION, FAULTS, "unexpected", f"{where}: {type(error).__name__}: {error}")
        if error is not None and "(injected)" not in str(error):
            tally.problem(SECTION, FAULTS, "unexpected", f"{where}: the error does not say why: {error}")
        after = look(url, FAULT_CONFIG, known=known)
        for name, held in after.items():
            if held.problem:
                tally.problem(SECTION, FAULTS, "corruption", f"{where}: {name}: {held.problem}")
            elif name in before and held.etag != before[name].etag and held.epoch != epoch:
                tally.problem(SECTION, FAULTS, "corruption", f"{where}: {name} holds epoch {held.epoch}, "
                                                             f"neither {before[name].epoch} nor {epoch}")
        # only a save that succeeded may remove, and only what the clean save removes
        gone = versions(before, FAULT_CONFIG) - versions(after, FAULT_CONFIG)
        allowed = clean["versions"] if error is None else set()
        if gone - allowed:
            tally.problem(SECTION, FAULTS, "lost", f"{where} ({failed_call} failed): versions gone: {sorted(gone - allowed)}")
        names_gone = identities(before, set(before) - set(after), FAULT_CONFIG)
        if names_gone - (clean["names"] if error is None else set()):
            tally.problem(SECTION, FAULTS, "lost", f"{where} ({failed_call} failed): objects gone: "
                                                   f"{sorted(names_gone - (clean['names'] if error is None else set()))}")
        stamps = _timestamps(after)
        for name, held in after.items():  # an archive or member copy of what is still current is garbage
            base = owner_of(name, FAULT_CONFIG)
            if name not in before and base and name != base and stamps.get(base) == stamps[name]:
                duplicates += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                restored = ckptfn.restore_from_directory(FAULT_CONFIG, url)
        except Exception as problem:  # noqa: BLE001
            tally.problem(SECTION, FAULTS, "unexpected", f"{where}: restore failed: {type(problem).__name__}: {problem}")
            return duplicates
        if restored != kept:
            tally.problem(SECTION, FAULTS, "lost", f"{where} ({failed_call} failed): the kept state "
                                                   f"{ckptfn.best_values(kept)} is not the bucket's {ckptfn.best_values(restored)}")
        metrics = fault_metrics(epoch)
        old = file_values(before, FAULT_CONFIG)
        for strategy in FAULT_CONFIG.strategies:
            if not hasattr(strategy, "metric_name"):
                continue
            new = ckptfn.best_values(restored)[strategy.filename]
            if new not in (old[strategy.filename], metrics[strategy.metric_name]):
                tally.problem(SECTION, FAULTS, "lost", f"{where}: {strategy.filename} restores {new}, neither "
                                                       f"{old[strategy.filename]} nor {metrics[strategy.metric_name]}")
    finally:
        drop_bucket(url)
    return duplicates


def faults(tally: Tally, *, epochs: tuple[int, ...] | None = None) -> int:
    """For each epoch of FAULT_HISTORY (or those given): the calls of its clean save, then each failing
    in turn. Returns the duplicates the failures left (``fault_trial``)."""
    tally.tried(SECTION, FAULTS, 0)
    duplicates = 0
    for epoch in range(len(FAULT_HISTORY)) if epochs is None else epochs:
        url, state = _replayed(epoch)
        try:
            before = look(url, FAULT_CONFIG)
            store, _ = store_for(url)
            recording = FaultyStore(store.fs, "s3")
            _, written = _save(url, state, epoch, recording)
            written.raise_error()
            after = look(url, FAULT_CONFIG, known=before)
            clean = {"versions": versions(before, FAULT_CONFIG) - versions(after, FAULT_CONFIG),
                     "names": identities(before, set(before) - set(after), FAULT_CONFIG)}
            calls = list(recording.calls)
        finally:
            drop_bucket(url)
        known = {**before, **{f"after:{name}": held for name, held in after.items()}}  # (by ETag)
        for index, name in enumerate(calls):
            duplicates += fault_trial(tally, epoch, index, clean, known, f"epoch {epoch}, call {index} ({name})")
    return duplicates


# --- the whole ------------------------------------------------------------------------------


def run(*, quick: bool = False, seed: int = 0) -> tuple[Tally, dict[str, str], str]:
    """Kills and request faults against moto on 127.0.0.1 (``quick``: the pytest sizes); the tally,
    what this machine could not run (with why), and one line saying where the kills landed and
    what the faults left."""
    tally = Tally()
    try:
        with s3_server() as server, ckptfn_log_kept():
            seen = kills(tally, server, QUICK_KILLS if quick else FULL_KILLS, seed=seed)
            seen["duplicates"] = faults(tally, epochs=QUICK_FAULT_EPOCHS if quick else None)
    except Unavailable as reason:
        return tally, {"object stores (S3)": str(reason)}, ""
    return tally, {}, summary(seen)


#: The epochs of FAULT_HISTORY whose saves the quick run fails call by call (2: an archive, its
#: pruning by keep=2 is not yet due, a top-k set-aside and a new member).
QUICK_FAULT_EPOCHS = (2,)


def summary(seen: Mapping[str, object]) -> str:
    """Where the kills landed and what the request faults left, in one line.

    >>> summary({"moments": [0.25, 0.75], "bytes": [(5 << 20, 20 << 20), (20 << 20, 20 << 20)], "duplicates": 2})
    'S3: single PUTs killed at 25%-75% of their duration; multipart uploads killed with 25%-100% of their bytes in the store; 2 failed requests left an archive copy of a current object (kept: the protocol cannot tell whether the request landed)'
    """
    parts = []
    if seen.get("moments"):
        shares = sorted(seen["moments"])
        parts.append(f"single PUTs killed at {shares[0]:.0%}-{shares[-1]:.0%} of their duration")
    if seen.get("bytes"):
        done = sorted(sent / size for sent, size in seen["bytes"])
        parts.append(f"multipart uploads killed with {done[0]:.0%}-{done[-1]:.0%} of their bytes in the store")
    if seen.get("duplicates"):
        parts.append(f"{seen['duplicates']} failed requests left an archive copy of a current object "
                     "(kept: the protocol cannot tell whether the request landed)")
    return ("S3: " + "; ".join(parts)) if parts else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SIGKILL S3 writers mid-upload and fail each request of a save (moto).")
    parser.add_argument("--quick", action="store_true", help="the reduced sizes of the pytest suite")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    tally, unavailable, landed = run(quick=args.quick, seed=args.seed)
    for (_, kind), row in tally.rows.items():
        print(f"{kind}: tried {row.tried}, unexpected {row.unexpected}, corruptions {row.corruption}, lost {row.lost}")
    for name, reason in unavailable.items():
        print(f"not run here: {name}: {reason}")
    print(landed or "", f"({time.monotonic() - started:.0f} s)")
    for problem in tally.problems[:30]:
        print("  " + problem)
    return 1 if tally.problems or unavailable else 0

"""The models-directory scan on written tiny models: ids, stability, split models, the ``known`` cache, bad files."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import pytest
from msgspec.structs import replace

import gguf_files as g
from optimanode.executors import gguf as gguf_reader
from optimanode.executors import registry as registry_mod
from optimanode.executors.registry import Registry, executor_id_for, sha256_of
from optimanode.protocol import ModelInfo

T0 = 1_700_000_000.0  # the fake "now" of every test; files older than T0 - settle_s are settled
OLD = int(T0 - 3600)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    return d


def settled(*paths: Path) -> None:
    """Give files an mtime an hour before the fake clock: written long ago."""
    for p in paths:
        os.utime(p, (OLD, OLD))


def recent(p: Path, age_s: float = 0.5) -> None:
    """Give a file an mtime just before the fake clock: possibly still being written."""
    t = int((T0 - age_s) * 1e9)
    os.utime(p, ns=(t, t))


def registry(models: Path, **kw) -> Registry:
    return Registry(models, clock=Clock(), **kw)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path whose header the registry parses, in order."""
    calls: list[str] = []
    real = gguf_reader.read_header

    def counting(path):
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(gguf_reader, "read_header", counting)
    return calls


# -- ids -----------------------------------------------------------------------------------------


def test_executor_id_is_slug_and_path_hash(models: Path) -> None:
    """The id is a slug of the stem plus 8 hex of the SHA-1 of the path relative to models_dir."""
    p = models / "sub" / "My Model.Q4_K_M.gguf"
    digest = hashlib.sha1(b"sub/My Model.Q4_K_M.gguf").hexdigest()[:8]
    assert executor_id_for(models, p) == f"my-model-q4-k-m-{digest}"


def test_split_parts_share_the_id_of_the_first_part(models: Path) -> None:
    """Every part of a split model maps to the id of part 1, named without the -0000N-of-0000M suffix."""
    digest = hashlib.sha1(b"big/Qwen-00001-of-00003.gguf").hexdigest()[:8]
    ids = {executor_id_for(models, models / "big" / f"Qwen-{i:05d}-of-00003.gguf") for i in (1, 2, 3)}
    assert ids == {f"qwen-{digest}"}


def test_ids_are_stable_across_scans_and_instances(models: Path) -> None:
    settled(g.write_model(models / "a.gguf"), *g.write_split(models))
    first = registry(models).scan()
    again = registry(models).scan()
    assert set(first.models) == set(again.models) == {executor_id_for(models, models / "a.gguf"),
                                                       executor_id_for(models, models / "x-00001-of-00003.gguf")}


def test_renaming_gives_a_new_executor(models: Path) -> None:
    p = g.write_model(models / "a.gguf")
    settled(p)
    reg = registry(models)
    before = set(reg.scan().models)
    p.rename(models / "b.gguf")
    after = set(reg.scan().models)
    assert before.isdisjoint(after) and len(after) == 1


# -- valid models --------------------------------------------------------------------------------


def test_valid_model_is_registered_from_its_header(models: Path) -> None:
    (models / "sub").mkdir()
    p = g.write_model(models / "sub" / "tiny.gguf", name="Tiny", context_length=4096)
    settled(p)
    res = registry(models).scan()
    st = p.stat()
    assert res.models == {executor_id_for(models, p): ModelInfo(
        path=str(p), files=[str(p)], size_bytes=st.st_size, mtime_ns=st.st_mtime_ns, architecture="llama",
        name="Tiny", size_label="104", parameter_count=g.TINY_PARAMS, file_type="F32", context_length=4096,
        chat_template=True, tensor_count=3, block_count=1, embedding_length=8, head_count=2, head_count_kv=1,
        sha256="", pooling="mean", layer_bytes=[256], other_bytes=160, n_vocab=4, output_bytes=128,
        output_tied=True)}
    assert (res.invalid, res.pending, res.errors, res.headers_read) == ({}, [], {}, 1)


def test_hidden_and_other_files_are_ignored(models: Path) -> None:
    """Only *.gguf files count; names starting with '.' (temporary copies) are skipped."""
    src = g.write_model(models / "a.gguf")
    settled(g.copy(src, models / ".a.gguf.part"), g.copy(src, models / ".hidden.gguf"),
            g.copy(src, models / "a.bin"), src)
    (models / ".cache").mkdir()
    settled(g.copy(src, models / ".cache" / "c.gguf"))
    assert [m.path for m in registry(models).scan().models.values()] == [str(src)]


def test_a_name_that_is_not_utf8_is_listed_as_an_error_and_the_rest_registers(models: Path) -> None:
    """The journal, the link and the logs carry paths as UTF-8 text: such a file (or directory) is
    named in the scan's errors, escaped, and not registered; the other models are."""
    src = g.write_model(models / "a.gguf")
    bad = os.fsdecode(os.fsencode(str(models)) + b"/caf\xe9.gguf")
    bad_dir = os.fsdecode(os.fsencode(str(models)) + b"/d\xff")
    g.copy(src, Path(bad))
    os.mkdir(bad_dir)
    g.copy(src, Path(bad_dir) / "b.gguf")
    settled(src, Path(bad), Path(bad_dir) / "b.gguf")
    result = registry(models).scan()
    assert [m.path for m in result.models.values()] == [str(src)] and not result.invalid
    reason = "the name is not valid UTF-8: rename it (the node records paths as UTF-8 text)"
    assert result.errors == {f"{models}/caf\\xe9.gguf": reason, f"{models}/d\\xff": reason}
    for text in result.errors:
        text.encode("utf-8")  # every message encodes


def test_upper_case_suffix_counts(models: Path) -> None:
    settled(g.write_model(models / "A.GGUF"))
    assert len(registry(models).scan().models) == 1


# -- invalid files -------------------------------------------------------------------------------


def test_bad_files_are_invalid_with_a_reason_and_the_rest_registers(models: Path) -> None:
    good = g.write_model(models / "good.gguf")
    full = g.write_model(models / "src.gguf")
    size = full.stat().st_size
    bad = {
        "magic.gguf": g.write_bad_magic(models / "magic.gguf"),
        "absurd.gguf": g.write_absurd_string(models / "absurd.gguf"),
        "v1.gguf": g.write_version(models / "v1.gguf", 1),
        "vocab.gguf": g.write_vocab_only(models / "vocab.gguf"),
        "cut.gguf": g.truncate(full, models / "cut.gguf", cut=16),
        "empty.gguf": models / "empty.gguf",
    }
    bad["empty.gguf"].touch()
    settled(good, full, *bad.values())
    res = registry(models).scan()
    reasons = {Path(info.path).name: why for info, why in res.invalid.values()}
    assert reasons == {
        "magic.gguf": "not a GGUF file (magic b'GGML', expected b'GGUF')",
        "absurd.gguf": "header runs past the end of the file (59 bytes): truncated or corrupt",
        "v1.gguf": "unsupported GGUF version 1 (supported: 2, 3)",
        "vocab.gguf": "vocabulary-only GGUF: holds no weights",
        "cut.gguf": f"truncated: has {size - 16} bytes, tensor data needs {size}",
        "empty.gguf": "not a GGUF file (0 bytes, no GGUF magic)",
    }
    assert {Path(m.path).name for m in res.models.values()} == {"good.gguf", "src.gguf"}
    for eid, (info, _) in res.invalid.items():
        p = Path(info.path)
        assert eid == executor_id_for(models, p)
        assert (info.files, info.size_bytes, info.mtime_ns) == ([str(p)], p.stat().st_size, p.stat().st_mtime_ns)
        assert info.tensor_count == 0


def test_unreadable_file_is_invalid(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that cannot be opened (EACCES) is invalid with the OS reason, not a scan error."""
    p = g.write_model(models / "a.gguf")
    settled(p)

    def denied(path):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    monkeypatch.setattr(gguf_reader, "read_header", denied)
    ((_, why),) = registry(models).scan().invalid.values()
    assert why == "cannot read: Permission denied"


def test_unexpected_reader_error_is_invalid_not_raised(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a reader bug on one file leaves the scan standing: that file is invalid, saying what happened."""
    settled(g.write_model(models / "a.gguf"))

    def broken(path):
        raise ValueError("boom")

    monkeypatch.setattr(gguf_reader, "read_header", broken)
    ((_, why),) = registry(models).scan().invalid.values()
    assert why == "cannot parse header (ValueError: boom)"


def test_file_removed_between_listing_and_reading_is_left_out(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settled(g.write_model(models / "a.gguf"))

    def gone(path):
        raise FileNotFoundError(2, "No such file or directory", os.fspath(path))

    monkeypatch.setattr(gguf_reader, "read_header", gone)
    res = registry(models).scan()
    assert (res.models, res.invalid, res.errors) == ({}, {}, {})


def test_split_part_without_its_suffix_is_invalid(models: Path) -> None:
    """A part renamed without -0000N-of-0000M cannot be loaded by llama.cpp: invalid, saying why."""
    part = g.write_split(models)[1]
    for p in models.glob("x-*.gguf"):
        if p != part:
            p.unlink()
    settled(part.rename(models / "renamed.gguf"))
    ((_, why),) = registry(models).scan().invalid.values()
    assert why == "part 2 of a 3-part split model, but its name lacks the -00002-of-00003 suffix"


# -- split models --------------------------------------------------------------------------------


def test_complete_split_model_is_one_executor(models: Path) -> None:
    parts = g.write_split(models, parts=3)
    settled(*parts)
    res = registry(models).scan()
    ((eid, info),) = res.models.items()
    assert eid == executor_id_for(models, parts[0]) and info.path == str(parts[0])
    assert info.files == [str(p) for p in parts]
    assert info.size_bytes == sum(p.stat().st_size for p in parts)
    assert info.mtime_ns == max(p.stat().st_mtime_ns for p in parts)
    # Counts cover every part; the metadata comes from part 1.
    assert (info.tensor_count, info.parameter_count, info.architecture, info.context_length) == (3, 96, "llama", 4096)
    assert res.invalid == {} and res.pending == []


def test_split_mtime_is_the_latest_part(models: Path) -> None:
    parts = g.write_split(models)
    settled(*parts)
    os.utime(parts[1], (OLD + 5, OLD + 5))
    (info,) = registry(models).scan().models.values()
    assert info.mtime_ns == (OLD + 5) * 10**9


@pytest.mark.parametrize("gone, reason", [([2], "split model: part 2 of 3 missing"),
                                          ([1, 3], "split model: parts 1, 3 of 3 missing")])
def test_split_model_with_a_part_missing_is_invalid(models: Path, gone: list[int], reason: str) -> None:
    parts = g.write_split(models)
    for i in gone:
        parts[i - 1].unlink()
    settled(*(p for p in parts if p.exists()))
    res = registry(models).scan()
    assert res.models == {}
    ((eid, (info, why)),) = res.invalid.items()
    assert why == reason
    assert eid == executor_id_for(models, parts[0]) and info.path == str(parts[0])
    assert info.files == [str(p) for p in parts if p.exists()]


def test_split_model_with_a_truncated_part_is_invalid(models: Path) -> None:
    parts = g.write_split(models)
    size = parts[2].stat().st_size
    g.truncate(parts[2], parts[2], cut=8)
    settled(*parts)
    ((_, why),) = registry(models).scan().invalid.values()
    assert why == f"split model: part 3 of 3: truncated: has {size - 8} bytes, tensor data needs {size}"


def test_split_part_numbers_must_match_the_header(models: Path) -> None:
    """Parts swapped by name (part 2 holds split.no 2) are refused: llama.cpp would refuse them too."""
    parts = g.write_split(models)
    tmp = models / "tmp"
    parts[1].rename(tmp)
    parts[2].rename(parts[1])
    tmp.rename(parts[2])
    settled(*parts)
    ((_, why),) = registry(models).scan().invalid.values()
    assert why == "split model: part 2 of 3 says it is part 3 of 3 (split.no, split.count)"


def test_split_part_beyond_the_count_is_invalid(models: Path) -> None:
    parts = g.write_split(models, parts=2)
    extra = g.copy(parts[1], models / "x-00003-of-00002.gguf")
    settled(*parts, extra)
    ((_, why),) = registry(models).scan().invalid.values()
    assert why == "split model: file name says part 3 of 2"


# -- stability -----------------------------------------------------------------------------------


def test_growing_file_is_pending_until_it_stops_changing(models: Path) -> None:
    """A file being copied is pending (never 'truncated') while its size or mtime moves, then registers."""
    src = g.write_model(models.parent / "src.gguf")
    data = src.read_bytes()
    dst = models / "m.gguf"
    reg = registry(models)

    dst.write_bytes(data[:100])  # the copy has started
    recent(dst)
    res = reg.scan()
    assert (res.pending, res.models, res.invalid) == ([str(dst)], {}, {})

    with open(dst, "ab") as f:  # more has arrived
        f.write(data[100:])
    recent(dst, age_s=0.1)
    res = reg.scan()
    assert (res.pending, res.models, res.invalid) == ([str(dst)], {}, {})

    res = reg.scan()  # unchanged since the last look: stable, though still younger than settle_s
    assert res.pending == [] and len(res.models) == 1


def test_truncated_file_is_pending_first_then_invalid(models: Path) -> None:
    """A cut file that stops changing is reported truncated, but only once it is stable."""
    cut = g.truncate(g.write_model(models.parent / "src.gguf"), models / "m.gguf")
    recent(cut)
    reg = registry(models)
    assert reg.scan().pending == [str(cut)]
    ((_, why),) = reg.scan().invalid.values()
    assert why.startswith("truncated")


def test_old_file_is_stable_on_first_look(models: Path) -> None:
    """A file whose mtime is more than settle_s old registers on the very first scan."""
    p = g.write_model(models / "m.gguf")
    recent(p, age_s=2.5)
    assert len(Registry(models, settle_s=2.0, clock=Clock()).scan().models) == 1
    recent(p, age_s=1.5)
    assert Registry(models, settle_s=2.0, clock=Clock()).scan().pending == [str(p)]


def test_recent_file_unchanged_since_known_is_stable(models: Path, reads: list[str]) -> None:
    """After a node restart, a young file that ``known`` recorded with the same size and mtime is not pending."""
    p = g.write_model(models / "m.gguf")
    recent(p)
    first = registry(models)
    first.scan()
    known = first.scan().models
    reads.clear()
    restarted = registry(models).scan(known)
    assert restarted.models == known and restarted.pending == [] and reads == []


def test_split_model_waits_for_every_part(models: Path) -> None:
    """One part still arriving keeps the whole split model, every part listed, pending (not 'part missing')."""
    parts = g.write_split(models)
    settled(parts[0], parts[2])
    parts[1].unlink()  # not there yet
    reg = registry(models)
    assert reg.scan().invalid  # all present parts stable, one absent: that is a broken model
    g.write_split(models)
    settled(parts[0], parts[2])
    recent(parts[1])  # now arriving
    res = reg.scan()
    assert (res.pending, res.models, res.invalid) == ([str(p) for p in parts], {}, {})
    assert len(reg.scan().models) == 1


# -- removal, change, and the known cache --------------------------------------------------------


def test_removed_file_is_gone_from_the_result(models: Path) -> None:
    a, b = g.write_model(models / "a.gguf"), g.write_model(models / "b.gguf")
    settled(a, b)
    reg = registry(models)
    known = reg.scan().models
    b.unlink()
    res = reg.scan(known)
    assert set(res.models) == {executor_id_for(models, a)}


def test_known_skips_header_reads_and_keeps_sha256(models: Path, reads: list[str]) -> None:
    """Unchanged size and mtime: the ModelInfo comes from ``known`` (sha256 included) without opening the file."""
    files = [g.write_model(models / f"m{i}.gguf") for i in range(4)] + g.write_split(models)
    settled(*files)
    first = registry(models).scan()
    assert len(reads) == len(files) and first.headers_read == len(files)
    known = {eid: replace(info, sha256=f"{i:064x}") for i, (eid, info) in enumerate(first.models.items())}
    reads.clear()
    again = registry(models).scan(known)  # a fresh Registry: nothing but ``known`` to go on
    assert reads == [] and again.headers_read == 0
    assert again.models == known


def test_changed_file_is_reread_and_loses_its_sha256(models: Path, reads: list[str]) -> None:
    p = g.write_model(models / "m.gguf", name="Before")
    settled(p)
    reg = registry(models)
    (eid, info), = reg.scan().models.items()
    known = {eid: replace(info, sha256="ab" * 32)}
    after = "After, " + "with a much longer name " * 8
    g.write_model(p, name=after)
    os.utime(p, (OLD + 60, OLD + 60))
    reads.clear()
    res = reg.scan(known)
    assert reads == [str(p)]
    new = res.models[eid]
    assert (new.name, new.sha256, new.mtime_ns) == (after, "", (OLD + 60) * 10**9)
    assert new.size_bytes == p.stat().st_size != info.size_bytes


def test_touched_file_is_reread(models: Path, reads: list[str]) -> None:
    """Same size, new mtime: the header is read again and sha256 cleared (contents may differ)."""
    p = g.write_model(models / "m.gguf")
    settled(p)
    reg = registry(models)
    known = {eid: replace(i, sha256="ab" * 32) for eid, i in reg.scan().models.items()}
    os.utime(p, (OLD + 1, OLD + 1))
    reads.clear()
    (info,) = reg.scan(known).models.values()
    assert reads == [str(p)] and info.sha256 == ""


def test_known_invalid_entry_is_not_trusted(models: Path, reads: list[str]) -> None:
    """An invalid ModelInfo passed back in ``known`` is re-read, so it stays invalid."""
    p = g.write_bad_magic(models / "m.gguf")
    settled(p)
    reg = registry(models)
    known = {eid: info for eid, (info, _) in reg.scan().invalid.items()}
    reads.clear()
    res = reg.scan(known)
    assert reads == [str(p)] and res.models == {} and len(res.invalid) == 1


def test_known_from_another_models_dir_is_not_trusted(tmp_path: Path, reads: list[str]) -> None:
    """Same relative path (same id) under another directory: different path, so the header is read."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    settled(g.write_model(a / "m.gguf"))
    settled(g.copy(a / "m.gguf", b / "m.gguf"))
    known = registry(a).scan().models
    reads.clear()
    res = registry(b).scan(known)
    assert reads == [str(b / "m.gguf")] and [m.path for m in res.models.values()] == [str(b / "m.gguf")]


# -- directories ---------------------------------------------------------------------------------


def test_unlistable_subdirectory_is_an_error_and_the_rest_is_scanned(models: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """scandir failing on one subdirectory (simulated EACCES, so it also runs as root) is reported, not raised."""
    (models / "locked").mkdir()
    settled(g.write_model(models / "locked" / "x.gguf"), g.write_model(models / "ok.gguf"))
    real = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(registry_mod.os, "scandir", scandir)
    res = registry(models).scan()
    assert res.errors == {str(models / "locked"): "cannot read directory: Permission denied"}
    assert [Path(m.path).name for m in res.models.values()] == ["ok.gguf"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 directory anyway; the test above simulates it")
def test_chmod_000_subdirectory_is_an_error_and_the_rest_is_scanned(models: Path) -> None:
    locked = models / "locked"
    locked.mkdir()
    settled(g.write_model(locked / "x.gguf"), g.write_model(models / "ok.gguf"))
    locked.chmod(0)
    try:
        res = registry(models).scan()
    finally:
        locked.chmod(0o755)
    assert list(res.errors) == [str(locked)]
    assert [Path(m.path).name for m in res.models.values()] == ["ok.gguf"]


def test_missing_models_directory_is_an_error(tmp_path: Path) -> None:
    res = registry(tmp_path / "nope").scan()
    assert res.models == {} and list(res.errors) == [str(tmp_path / "nope")]


def test_symlink_loop_ends_and_linked_trees_are_scanned(tmp_path: Path, models: Path) -> None:
    """Symlinked directories are followed once each: a loop back to the root ends the walk."""
    outside = tmp_path / "outside"
    outside.mkdir()
    settled(g.write_model(outside / "o.gguf"), g.write_model(models / "m.gguf"))
    (models / "loop").symlink_to(models)
    (models / "ext").symlink_to(outside)
    (models / "ext2").symlink_to(outside)  # the same tree again: entered once
    res = registry(models).scan()
    assert sorted(Path(m.path).relative_to(models).as_posix() for m in res.models.values()) == ["ext/o.gguf", "m.gguf"]
    assert res.errors == {}


def test_broken_symlink_is_an_error(models: Path) -> None:
    (models / "dangling.gguf").symlink_to(models / "nowhere.gguf")
    res = registry(models).scan()
    assert list(res.errors) == [str(models / "dangling.gguf")]
    assert "broken symlink" in res.errors[str(models / "dangling.gguf")]


def test_id_clash_keeps_the_first_path(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two paths with one id (forced here; an 8-hex SHA-1 clash in real life) do not overwrite each other."""
    settled(g.write_model(models / "a.gguf"), g.write_model(models / "b.gguf"))
    monkeypatch.setattr(registry_mod, "_id", lambda rel, stem: "same")
    res = registry(models).scan()
    assert [m.path for m in res.models.values()] == [str(models / "a.gguf")]
    assert res.errors == {str(models / "b.gguf"): f"executor id same is already used by {models / 'a.gguf'}; "
                                                  "rename one of them"}


def test_many_files_in_subfolders(models: Path) -> None:
    """make_many's tree (the benchmark's) registers every file under a distinct id."""
    g.make_many(models, 250, per_dir=100)
    res = Registry(models).scan()
    assert len(res.models) == 250 and res.headers_read == 250


# -- content identity ----------------------------------------------------------------------------


def test_sha256_of_covers_all_parts_in_order(models: Path) -> None:
    parts = g.write_split(models)
    whole = b"".join(p.read_bytes() for p in parts)
    assert sha256_of([str(p) for p in parts], chunk=100) == hashlib.sha256(whole).hexdigest()
    assert sha256_of([str(p) for p in reversed(parts)]) != hashlib.sha256(whole).hexdigest()


@pytest.mark.parametrize("gone", ["removed", "a directory now"])
async def test_hash_loop_skips_an_unreadable_file_once_and_hashes_the_rest(
        tmp_path: Path, models: Path, gone: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A registered file that cannot be read is logged once and skipped; the loop goes on (no exit,
    so no ``TaskExited`` from the node's guard), hashes the others, and retries it once it changes."""
    import asyncio
    import logging

    from optimanode.config import load_settings
    from optimanode.executors import scanner as scanner_mod
    from optimanode.executors.runtime import Background, Runtime
    from optimanode.executors.scanner import Scanner
    from optimanode.journal import Journal

    paths = [g.write_model(models / f"{n}.gguf", name=n) for n in ("a", "b")]
    settled(*paths)
    settings = load_settings(environ={}, overrides={"models_dir": str(models), "state_dir": str(tmp_path / "state")})
    journal = await Journal.open(tmp_path / "j.sqlite3", background_check_delay_s=None)
    try:
        runtime = Runtime(settings, journal, Background(), clock=Clock())
        scanner = Scanner(runtime, registry(models))
        await scanner.rescan()
        bad, good = list(runtime.executors.values())  # in the order hash_loop takes them: the bad one first
        bad_path = Path(bad.info.path)
        bad_path.unlink()
        if gone == "a directory now":
            bad_path.mkdir()
        tried: list[str] = []
        real_sha, real_sleep = scanner_mod.sha256_of, asyncio.sleep
        passes = 0

        def counting_sha(files, *a, **kw):
            tried.extend(files)
            return real_sha(files, *a, **kw)

        async def quick_sleep(delay, *a, **kw):  # the 5 s between passes, shortened
            nonlocal passes
            if delay == 5.0:
                passes += 1
                delay = 0.01
            return await real_sleep(delay, *a, **kw)

        monkeypatch.setattr(scanner_mod, "sha256_of", counting_sha)
        monkeypatch.setattr(asyncio, "sleep", quick_sleep)
        caplog.set_level(logging.WARNING, logger=scanner_mod.__name__)
        task = asyncio.create_task(scanner.hash_loop())
        try:
            async with asyncio.timeout(10):
                while passes < 5 and not task.done():
                    await real_sleep(0.01)
            assert not task.done(), task.exception()  # the loop did not exit
            want = hashlib.sha256(paths[1].read_bytes()).hexdigest()
            assert good.info.sha256 == want and journal.views()[good.id].info.sha256 == want
            assert bad.info.sha256 == ""
            assert tried.count(str(bad_path)) == 1  # not retried every pass
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and str(bad_path) in warnings[0] and bad.id in warnings[0], warnings
            # The file is back, changed: the rescan re-registers it and the next pass hashes it.
            if bad_path.is_dir():
                bad_path.rmdir()
            g.write_model(bad_path, name="a2")
            settled(bad_path)
            os.utime(bad_path, (OLD + 1, OLD + 1))
            await scanner.rescan()
            want = hashlib.sha256(bad_path.read_bytes()).hexdigest()
            async with asyncio.timeout(10):
                while not bad.info.sha256 and not task.done():
                    await real_sleep(0.01)
            assert not task.done() and bad.info.sha256 == want
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await journal.close()

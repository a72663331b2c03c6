"""Install helpers: atomic folders, zip modes, missing tools."""

import stat
import zipfile
from pathlib import Path

import pytest

from engine.errors import MissingToolError, StackError
from engine.stack.install import install_atomically, java_home, maven, run_checked, unzip_with_modes


def test_install_creates_the_target_once(tmp_path: Path) -> None:
    target = tmp_path / "dist" / "thing"
    calls: list[Path] = []

    def fill(into: Path) -> None:
        calls.append(into)
        (into / "file").write_text("done")

    assert install_atomically(target, fill) is True
    assert install_atomically(target, fill) is False
    assert (target / "file").read_text() == "done"
    assert len(calls) == 1


def test_an_interrupted_install_is_redone(tmp_path: Path) -> None:
    target = tmp_path / "thing"

    def crash(into: Path) -> None:
        (into / "half").write_text("half")
        raise KeyboardInterrupt  # killed mid-download

    with pytest.raises(KeyboardInterrupt):
        install_atomically(target, crash)
    assert not target.exists()
    assert (tmp_path / "thing.partial" / "half").exists()

    install_atomically(target, lambda into: (into / "whole").write_text("whole"))
    assert sorted(p.name for p in target.iterdir()) == ["whole"]
    assert not (tmp_path / "thing.partial").exists()


def test_unzip_keeps_exec_bits(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        info = zipfile.ZipInfo("pkg/bin/run")
        info.external_attr = (stat.S_IFREG | 0o755) << 16
        zipped.writestr(info, "#!/bin/sh\necho hi\n")
        zipped.writestr("pkg/README", "text")
    unzip_with_modes(archive, tmp_path / "out")
    assert (tmp_path / "out/pkg/bin/run").stat().st_mode & 0o111
    assert (tmp_path / "out/pkg/README").read_text() == "text"


def test_missing_maven_and_java_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no tools at all
    with pytest.raises(MissingToolError, match=r"'mvn' is required .* Install Apache Maven"):
        maven(["--version"], "kafka")
    with pytest.raises(MissingToolError, match=r"'java' is required .* JDK 17"):
        java_home()


def test_java_on_this_machine_is_new_enough() -> None:
    assert (java_home() / "bin" / "java").exists()


def test_failed_command_reports_its_output() -> None:
    with pytest.raises(StackError, match="exited with 3") as caught:
        run_checked(["sh", "-c", "echo boom >&2; exit 3"], "demo")
    assert "boom" in caught.value.log_tail

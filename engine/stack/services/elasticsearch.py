"""Elasticsearch, one node, from Maven Central's ``integ-test-zip`` distribution.

What the zip implies:

- it has no bundled JDK, so ``ES_JAVA_HOME`` points at the system Java 17;
- it contains x-pack security, switched off here (loopback only, local data);
- Elasticsearch refuses to run as root, so a dedicated system user runs it;
- it lacks the analysis-common, mapper-extras and painless modules, so index
  mappings must stick to core analyzers and field types;
- readiness is the cluster health API reaching yellow (one node has no replicas).
"""

from __future__ import annotations

import json
import shutil
import signal
import urllib.error
import urllib.request
from pathlib import Path

from engine.settings import Settings, env_var
from engine.stack.install import (
    Report,
    chown_tree,
    ensure_os_user,
    install_atomically,
    java_home,
    maven,
    unzip_with_modes,
)
from engine.stack.layout import StackLayout
from engine.stack.process import Launch
from engine.stack.versions import ELASTICSEARCH_VERSION

_ARTIFACT = "org.elasticsearch.distribution.integ-test-zip:elasticsearch"


class ElasticsearchService:
    name = "elasticsearch"
    stop_signal = signal.SIGTERM

    def __init__(self, settings: Settings, layout: StackLayout) -> None:
        _, self.port = settings.elasticsearch.host_port()
        self.port_setting = env_var("elasticsearch", "url")
        self._transport_port = settings.stack.elasticsearch_transport_port
        self._heap = settings.stack.elasticsearch_heap
        self.os_user: str | None = settings.stack.elasticsearch_os_user
        self._os_user = settings.stack.elasticsearch_os_user
        self._dir = layout.service_dir(self.name)
        self._dist = layout.dist / f"elasticsearch-{ELASTICSEARCH_VERSION}"

    @property
    def _config_dir(self) -> Path:
        return self._dir / "config"

    def install(self, report: Report) -> None:
        def fetch(into: Path) -> None:
            report(f"fetching Elasticsearch {ELASTICSEARCH_VERSION} from Maven Central (once)")
            download = into / "download"
            pom = into / "pom.xml"
            # dependency:copy needs a project to run in; an empty one will do.
            pom.write_text(
                '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
                "<groupId>local.engine.stack</groupId><artifactId>es-download</artifactId>"
                "<version>1</version><packaging>pom</packaging></project>\n"
            )
            maven(
                [
                    "-f",
                    str(pom),
                    "dependency:copy",
                    f"-Dartifact={_ARTIFACT}:{ELASTICSEARCH_VERSION}:zip",
                    f"-DoutputDirectory={download.resolve()}",
                ],
                "elasticsearch",
            )
            unzip_with_modes(
                download / f"elasticsearch-{ELASTICSEARCH_VERSION}.zip", into / "unzipped"
            )
            home = into / "unzipped" / f"elasticsearch-{ELASTICSEARCH_VERSION}"
            for entry in home.iterdir():
                entry.rename(into / entry.name)
            shutil.rmtree(into / "unzipped")
            shutil.rmtree(download)
            pom.unlink()

        install_atomically(self._dist, fetch)
        ensure_os_user(self._os_user, report)

    def prepare(self, report: Report) -> None:
        if not self._config_dir.exists():
            shutil.copytree(self._dist / "config", self._config_dir)
        for folder in ("data", "logs", "tmp"):
            (self._dir / folder).mkdir(parents=True, exist_ok=True)
        (self._config_dir / "elasticsearch.yml").write_text(self._node_config())
        (self._config_dir / "jvm.options.d" / "heap.options").write_text(
            f"-Xms{self._heap}\n-Xmx{self._heap}\n"
        )
        chown_tree(self._dir, self._os_user)

    def _node_config(self) -> str:
        settings = {
            "cluster.name": "engine-local",
            "node.name": "engine-local-1",
            "network.host": "127.0.0.1",
            "http.port": str(self.port),
            "transport.port": str(self._transport_port),
            "discovery.type": "single-node",
            "xpack.security.enabled": "false",
            "path.data": str((self._dir / "data").resolve()),
            "path.logs": str((self._dir / "logs").resolve()),
            # Tests fill the disk of a shared machine less than ES assumes; don't
            # turn indices read-only at 95% of a big disk.
            "cluster.routing.allocation.disk.threshold_enabled": "false",
        }
        return "".join(f"{key}: {value}\n" for key, value in settings.items())

    def launch(self) -> Launch:
        return Launch(
            argv=[str((self._dist / "bin" / "elasticsearch").resolve())],
            env={
                "ES_JAVA_HOME": str(java_home()),
                "ES_PATH_CONF": str(self._config_dir.resolve()),
                "ES_TMPDIR": str((self._dir / "tmp").resolve()),
            },
            os_user=self._os_user,
        )

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.port}/_cluster/health?wait_for_status=yellow&timeout=1s"
        try:
            with urllib.request.urlopen(url, timeout=3.0) as response:
                body = json.load(response)
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return body.get("status") in {"green", "yellow"}

    def after_start(self, report: Report) -> None:
        return None

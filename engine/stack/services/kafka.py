"""Apache Kafka, one node in KRaft mode (broker and controller in one process).

The broker jars come from Maven Central (``org.apache.kafka:kafka_2.13`` with
its dependencies) and are run with the same main classes the official shell
scripts use: ``kafka.tools.StorageTool`` formats the log folder once,
``kafka.Kafka`` runs the server. reload4j is the logging backend.
"""

from __future__ import annotations

import base64
import shutil
import signal
import socket
import struct
import uuid
from pathlib import Path

from engine.settings import Settings, env_var
from engine.stack.install import Report, install_atomically, java_home, maven, run_checked
from engine.stack.layout import StackLayout
from engine.stack.process import Launch
from engine.stack.versions import KAFKA_SCALA_VERSION, KAFKA_VERSION, SLF4J_VERSION

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.engine.stack</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-reload4j</artifactId>
      <version>{slf4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J = """log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.org.apache.kafka=WARN
log4j.logger.kafka.request.logger=WARN
"""

_MAIN = "kafka.Kafka"
_STORAGE_TOOL = "kafka.tools.StorageTool"


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka's own generator avoids a leading dash too
            return text


def api_versions_ok(host: str, port: int) -> bool:
    """True if a Kafka broker answers an ApiVersions request (v0) without error."""
    client_id = b"engine-stack"
    header = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            sock.sendall(struct.pack(">i", len(header)) + header)
            reply = sock.recv(10)
    except OSError:
        return False
    if len(reply) < 10:
        return False
    _size, correlation_id, error_code = struct.unpack(">iih", reply)
    return bool(correlation_id == 1 and error_code == 0)


class KafkaService:
    name = "kafka"
    stop_signal = signal.SIGTERM  # controlled shutdown
    os_user: str | None = None

    def __init__(self, settings: Settings, layout: StackLayout) -> None:
        _, self.port = settings.kafka.first_host_port()
        self.port_setting = env_var("kafka", "bootstrap_servers")
        self._controller_port = settings.stack.kafka_controller_port
        self._partitions = settings.kafka.partitions
        self._heap = settings.stack.kafka_heap
        self._dir = layout.service_dir(self.name)
        self._dist = layout.dist / f"kafka_{KAFKA_SCALA_VERSION}-{KAFKA_VERSION}"

    @property
    def _config(self) -> Path:
        return self._dir / "server.properties"

    @property
    def _log_dirs(self) -> Path:
        return self._dir / "data"

    def _classpath(self) -> str:
        return str((self._dist / "libs").resolve()) + "/*"

    def _java(self) -> str:
        return str(java_home() / "bin" / "java")

    def install(self, report: Report) -> None:
        def fetch(into: Path) -> None:
            report(f"fetching Kafka {KAFKA_VERSION} jars from Maven Central (first run only)")
            pom = into / "pom.xml"
            pom.write_text(
                _POM.format(scala=KAFKA_SCALA_VERSION, kafka=KAFKA_VERSION, slf4j=SLF4J_VERSION)
            )
            maven(
                [
                    "-f",
                    str(pom),
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={(into / 'libs').resolve()}",
                ],
                "kafka",
            )

        install_atomically(self._dist, fetch)

    def prepare(self, report: Report) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        (self._dir / "log4j.properties").write_text(_LOG4J)
        self._config.write_text(self._server_properties())
        if (self._log_dirs / "meta.properties").exists():
            return
        if self._log_dirs.exists():
            shutil.rmtree(self._log_dirs)  # a format that never finished: start over
        report("formatting the Kafka log folder (KRaft)")
        run_checked(
            [
                self._java(),
                "-cp",
                self._classpath(),
                _STORAGE_TOOL,
                "format",
                "-t",
                new_cluster_id(),
                "-c",
                str(self._config.resolve()),
            ],
            "kafka",
        )

    def _server_properties(self) -> str:
        listener = f"127.0.0.1:{self.port}"
        controller = f"127.0.0.1:{self._controller_port}"
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{controller}",
            "listeners": f"PLAINTEXT://{listener},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{listener}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self._log_dirs.resolve()),
            "num.partitions": str(self._partitions),
            # One node: every internal topic has one replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "min.insync.replicas": "1",
            # Tests and the demo start consumer groups often; don't wait 3 s each time.
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    def launch(self) -> Launch:
        return Launch(
            argv=[
                self._java(),
                f"-Xms{self._heap}",
                f"-Xmx{self._heap}",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j.configuration=file:{(self._dir / 'log4j.properties').resolve()}",
                "-cp",
                self._classpath(),
                _MAIN,
                str(self._config.resolve()),
            ],
        )

    def healthy(self) -> bool:
        return api_versions_ok("127.0.0.1", self.port)

    def after_start(self, report: Report) -> None:
        return None

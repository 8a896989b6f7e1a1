"""deploy/docker-compose.yml wires the server, Prometheus and Grafana together consistently.

    python -m pytest tests/test_compose.py -q

No Docker here, so this reads the files: every mounted file exists, Prometheus scrapes the compose
service at its port, Grafana's provisioned datasource is the one the dashboard names, and the dashboard
provider looks where the dashboard is mounted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def mounts(service: dict) -> dict[str, Path]:
    """container path -> host path for each bind mount, with ${VAR:-default} read as its default."""
    out = {}
    for volume in service.get("volumes", []):
        host, container = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume).split(":")[:2]
        out[container] = (DEPLOY / host).resolve()
    return out


def test_services_build_the_image_and_pin_third_party_images(compose):
    services = compose["services"]
    assert set(services) == {"loopgpt", "prometheus", "grafana"}
    build = services["loopgpt"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert services["loopgpt"]["ports"] == ["8000:8000"]
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name} image is not pinned: {image}"


def test_every_mounted_config_file_exists(compose):
    for name in ("prometheus", "grafana"):
        for container, host in mounts(compose["services"][name]).items():
            assert host.exists(), f"{name} mounts {host} at {container}, which does not exist"
    ckpt = mounts(compose["services"]["loopgpt"])
    assert ckpt["/ckpt"].name == "demo" and "/ckpt" in compose["services"]["loopgpt"]["command"]


def test_prometheus_scrapes_the_server_service(compose):
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    port = compose["services"]["loopgpt"]["ports"][0].split(":")[1]
    assert f"loopgpt:{port}" in targets, targets


def test_grafana_provisions_the_datasource_and_dashboard_it_uses(compose):
    grafana = mounts(compose["services"]["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in datasources}
    assert any(d["url"] == "http://prometheus:9090" for d in datasources)
    dashboard_text = (DEPLOY / "grafana" / "loopgpt.json").read_text()
    json.loads(dashboard_text)
    used = set(re.findall(r'"datasource":\s*\{[^}]*"uid":\s*"([^"]+)"', dashboard_text))
    assert used and used <= uids, f"the dashboard names datasources {used}, provisioned are {uids}"
    providers = yaml.safe_load((provisioning / "dashboards" / "loopgpt.yml").read_text())["providers"]
    folder = providers[0]["options"]["path"]
    assert any(container.startswith(folder + "/") and host.name == "loopgpt.json"
               for container, host in grafana.items()), f"no dashboard is mounted under {folder}"

"""NVIDIA's released files: the catalog, and fetching them from a (local) HTTP server or a mirror folder."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from helpers.http_server import serve

from maisi.models.weights import LEDGER, fetch_weights, load_weights_catalog, main
from maisi.sources.download import ChecksumError

FILES = {
    "models/autoencoder_v1.pt": b"autoencoder" * 100,
    "models/diff_unet_3d_rflow-ct.pt": b"diffusion" * 100,
    "models/controlnet_3d_rflow-ct.pt": b"controlnet" * 100,
}


def _catalog(tmp_path, pinned: str | None = None):
    entries = [
        {"repo": "nvidia/NV-Generate-CT", "path": p, "variants": ["rflow-ct"], "role": role, "sha256": None, "size_bytes": None}
        for p, role in zip(FILES, ("autoencoder", "diffusion", "controlnet"), strict=True)
    ]
    entries[0]["sha256"] = pinned
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "licence": "NVIDIA Open Model License", "revision": "main", "files": entries}))
    return load_weights_catalog(path)


@pytest.fixture
def server():
    with serve() as srv:
        for path, data in FILES.items():
            srv.add(f"nvidia/NV-Generate-CT/resolve/main/{path}", data)
        yield srv


def test_shipped_catalog_covers_both_released_variants():
    catalog = load_weights_catalog()
    assert catalog.licence == "NVIDIA Open Model License"
    for name in ("rflow-ct", "ddpm-ct"):
        roles = {f.role for f in catalog.for_variant(name, models_only=True)}
        assert roles == {"autoencoder", "diffusion", "controlnet"}
        assert {"mask_autoencoder", "mask_diffusion", "mask_database"} <= {f.role for f in catalog.for_variant(name)}
    assert all(f.repo == "nvidia/NV-Generate-CT" for f in catalog.files if {"rflow-ct", "ddpm-ct"} & set(f.variants))
    with pytest.raises(ValueError, match="factory's own"):
        catalog.for_variant("tiny")


def test_fetch_records_digests_and_checks_them_later(server, tmp_path):
    pinned = hashlib.sha256(FILES["models/autoencoder_v1.pt"]).hexdigest()
    catalog = _catalog(tmp_path, pinned)
    dest = tmp_path / "nvidia"
    paths = fetch_weights("rflow-ct", dest, base_url=server.base_url, catalog=catalog, progress=False)
    assert {role: p.read_bytes() for role, p in paths.items()} == dict(zip(("autoencoder", "diffusion", "controlnet"), FILES.values(), strict=True))
    ledger = yaml.safe_load((dest / LEDGER).read_text())
    assert ledger["models/diff_unet_3d_rflow-ct.pt"]["sha256"] == hashlib.sha256(FILES["models/diff_unet_3d_rflow-ct.pt"]).hexdigest()
    assert ledger["models/autoencoder_v1.pt"]["licence"] == "NVIDIA Open Model License"
    before = len(server.state.requests)
    fetch_weights("rflow-ct", dest, base_url=server.base_url, catalog=catalog, progress=False)
    assert len(server.state.requests) == before  # every file in place and matching: nothing fetched again
    # Upstream changes a file whose digest was recorded at the first fetch: the next fetch notices.
    server.add("nvidia/NV-Generate-CT/resolve/main/models/diff_unet_3d_rflow-ct.pt", b"changed" * 100)
    (dest / "models/diff_unet_3d_rflow-ct.pt").unlink()
    with pytest.raises(ChecksumError):
        fetch_weights("rflow-ct", dest, base_url=server.base_url, catalog=catalog, progress=False, retries=0)
    assert not (dest / "models/diff_unet_3d_rflow-ct.pt").exists()


def test_pinned_digest_mismatch_is_refused(server, tmp_path):
    catalog = _catalog(tmp_path, "0" * 64)
    with pytest.raises(ChecksumError):
        fetch_weights("rflow-ct", tmp_path / "nvidia", base_url=server.base_url, catalog=catalog, progress=False, retries=0)
    assert not (tmp_path / "nvidia" / "models/autoencoder_v1.pt").exists()


def test_mirror_folder_for_air_gapped_sites(tmp_path):
    catalog = _catalog(tmp_path)
    mirror = tmp_path / "mirror"
    for path, data in FILES.items():
        (mirror / path).parent.mkdir(parents=True, exist_ok=True)
        (mirror / path).write_bytes(data)
    paths = fetch_weights("rflow-ct", tmp_path / "nvidia", mirror=mirror, catalog=catalog)
    assert paths["controlnet"].read_bytes() == FILES["models/controlnet_3d_rflow-ct.pt"]
    (mirror / "models/controlnet_3d_rflow-ct.pt").write_bytes(b"corrupt")
    (tmp_path / "nvidia" / "models/controlnet_3d_rflow-ct.pt").unlink()
    with pytest.raises(ChecksumError, match="controlnet_3d_rflow-ct.pt"):
        fetch_weights("rflow-ct", tmp_path / "nvidia", mirror=mirror, catalog=catalog)
    (mirror / "models/controlnet_3d_rflow-ct.pt").unlink()
    with pytest.raises(FileNotFoundError, match="mirror file .*controlnet_3d_rflow-ct.pt not found"):
        fetch_weights("rflow-ct", tmp_path / "nvidia", mirror=mirror, catalog=catalog)


def test_command_prints_the_pretrained_block(server, tmp_path, capsys, monkeypatch):
    import maisi.models.weights as weights

    catalog = _catalog(tmp_path)
    monkeypatch.setattr(weights, "load_weights_catalog", lambda: catalog)
    dest = tmp_path / "nvidia"
    assert main(["fetch", "--variant", "rflow-ct", "--dest", str(dest), "--base-url", server.base_url]) == 0
    block = yaml.safe_load(capsys.readouterr().out)
    assert block["model"] == {"variant": "rflow-ct"}
    assert block["pretrained"]["diffusion"] == str(dest / "models/diff_unet_3d_rflow-ct.pt")
    assert main(["fetch", "--variant", "rflow-ct", "--dest", str(tmp_path / "other"), "--mirror", str(tmp_path / "none")]) == 1
    assert "mirror file" in capsys.readouterr().err


def _package(tmp_path, variant="tiny"):
    """A package data folder holding a variant's three checkpoints (random weights, release layouts) and a catalog
    that lists them as shipped with the package, with their digests."""
    from helpers.models import save_image_checkpoints

    root = tmp_path / "data"
    folder = root / "weights" / variant
    folder.mkdir(parents=True)
    paths = save_image_checkpoints(folder, variant)
    entries = [{"repo": "package", "path": f"weights/{variant}/{role}.pt", "variants": [variant], "role": role,
                "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest(), "size_bytes": len(open(p, "rb").read()),
                "licence": "Apache-2.0"} for role, p in paths.items()]  # fmt: skip
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "licence": "NVIDIA Open Model License", "revision": "main", "files": entries}))
    return load_weights_catalog(path), root, paths


def test_package_files_are_verified_before_use_and_load_like_any_checkpoint(tmp_path):
    """A released model shipped with the package is named in the config by catalog:<variant>; it resolves to the
    package file only while its digest matches, and loads through the checkpoint loaders; one changed byte is refused
    naming the file, and so is a reference to another variant than model.variant."""
    from maisi.models.checkpoints import load_autoencoder, load_controlnet, load_diffusion
    from maisi.models.weights import released_file, resolve_catalog_references

    catalog, root, paths = _package(tmp_path)
    cfg = {"model": {"variant": "tiny"}, "pretrained": {"autoencoder": "catalog:tiny", "diffusion": None},
           "train_diffusion": {"init_from": "catalog:tiny"}, "train_controlnet": {"init_from": "catalog:tiny"}}  # fmt: skip
    resolve_catalog_references(cfg, catalog=catalog, root=root)
    assert cfg["pretrained"] == {"autoencoder": paths["autoencoder"], "diffusion": None}
    assert (cfg["train_diffusion"]["init_from"], cfg["train_controlnet"]["init_from"]) == (paths["diffusion"], paths["controlnet"])
    load_autoencoder(cfg["pretrained"]["autoencoder"], "tiny")
    load_diffusion(cfg["train_diffusion"]["init_from"], "tiny")
    load_controlnet(cfg["train_controlnet"]["init_from"], "tiny")
    with pytest.raises(ValueError, match=r"'pretrained.autoencoder'.*variant 'tiny', but model.variant is 'rflow-ct'"):
        resolve_catalog_references({"model": {"variant": "rflow-ct"}, "pretrained": {"autoencoder": "catalog:tiny"}}, catalog=catalog, root=root)
    with pytest.raises(ValueError, match="names no variant"):
        resolve_catalog_references({"model": {"variant": "tiny"}, "pretrained": {"autoencoder": "catalog:big"}}, catalog=catalog, root=root)
    data = bytearray(open(paths["controlnet"], "rb").read())
    data[-100] ^= 1
    open(paths["controlnet"], "wb").write(bytes(data))
    with pytest.raises(ChecksumError, match="controlnet.pt"):
        released_file("tiny", "controlnet", catalog=catalog, root=root)
    cfg = {"model": {"variant": "tiny"}, "train_controlnet": {"init_from": "catalog:tiny"}}
    with pytest.raises(ValueError, match=r"'train_controlnet.init_from'.*sha256"):
        resolve_catalog_references(cfg, catalog=catalog, root=root)
    with pytest.raises(ValueError, match="not shipped with the package"):
        released_file("rflow-ct", "diffusion")  # NVIDIA's: fetched, then named by path


def test_package_files_need_a_pinned_digest_and_fetch_copies_them(tmp_path, monkeypatch):
    import maisi.models.weights as weights

    catalog, root, paths = _package(tmp_path)
    monkeypatch.setattr(weights, "package_path", lambda f, r=None: root / f.path)
    fetched = fetch_weights("tiny", tmp_path / "dest", catalog=catalog, progress=False)
    assert {role: p.read_bytes() for role, p in fetched.items()} == {role: open(p, "rb").read() for role, p in paths.items()}
    assert yaml.safe_load((tmp_path / "dest" / LEDGER).read_text())["weights/tiny/diffusion.pt"]["licence"] == "Apache-2.0"
    raw = yaml.safe_load((tmp_path / "catalog.yaml").read_text())
    raw["files"][0]["sha256"] = None
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="needs a pinned sha256"):
        load_weights_catalog(tmp_path / "catalog.yaml")

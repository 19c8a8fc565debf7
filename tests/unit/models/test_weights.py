"""NVIDIA's released files: the catalog, and fetching them from a (local) HTTP server or a mirror folder."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from helpers.http_server import serve

from maisi.models.weights import LEDGER, fetch_weights, load_weights_catalog, main
from maisi.sources.download import ChecksumError, DownloadError

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


def test_a_released_factory_variant_not_in_the_catalog_says_how_to_publish_it(tmp_path):
    catalog = _catalog(tmp_path)  # NVIDIA's files only
    with pytest.raises(ValueError, match=r"'phantom-ct' is not published in this package yet: make pretrain"):
        catalog.for_variant("phantom-ct")
    with pytest.raises(ValueError, match="factory's own; train it"):
        catalog.for_variant("tiny")


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


# --------------------------------------------------------------------------------------------
# a tampered or truncated file is never pinned


def _mirror(tmp_path, files=FILES):
    mirror = tmp_path / "mirror"
    for path, data in files.items():
        (mirror / path).parent.mkdir(parents=True, exist_ok=True)
        (mirror / path).write_bytes(data)
    return mirror


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_shipped_catalog_pins_the_published_digests():
    """NVIDIA's digests where Hugging Face publishes them (the LFS pointer of the file's page)."""
    files = {f.path: f for f in load_weights_catalog().files if f.repo == "nvidia/NV-Generate-CT"}
    assert files["models/autoencoder_v1.pt"].sha256 == "1f8a7a056d0ebc00486edc43c26768bf1c12eaa6df9dd172e34598003be95eb3"
    assert files["models/autoencoder_v1.pt"].size_bytes == 83_831_868
    assert files["models/mask_generation_autoencoder.pt"].sha256 == "539175f6ede3cb1e6f01bfd6347cd446d601cf4a508fc632a1e36362b1428a5d"


def test_command_refuses_a_tampered_mirror_file_on_first_fetch(tmp_path, capsys):
    """fetch --mirror with the shipped catalog: an autoencoder of the published size with one byte changed (here: all
    zeros) and one cut short are refused on the very first fetch; nothing is placed or pinned."""
    mirror = _mirror(tmp_path)
    autoencoder = mirror / "models/autoencoder_v1.pt"
    with open(autoencoder, "wb") as fh:
        fh.truncate(83_831_868)
    dest = tmp_path / "nvidia"
    argv = ["fetch", "--variant", "rflow-ct", "--dest", str(dest), "--mirror", str(mirror), "--models-only"]
    assert main(argv) == 1
    assert "sha256 mismatch" in capsys.readouterr().err and not (dest / "models/autoencoder_v1.pt").exists()
    with open(autoencoder, "r+b") as fh:
        fh.truncate(83_831_868 - 1000)
    assert main(argv) == 1
    assert "size in bytes" in capsys.readouterr().err and not (dest / "models/autoencoder_v1.pt").exists()
    assert "models/autoencoder_v1.pt" not in (yaml.safe_load((dest / LEDGER).read_text()) if (dest / LEDGER).exists() else {})


@pytest.mark.parametrize("listing", ["SHA256SUMS", "checksums.json"])
def test_mirror_digest_list_is_checked(tmp_path, listing):
    """A mirror may carry a digest list in its root (sha256sum's output, or the ledger a fetch writes): a file with
    one byte changed is refused even where the catalog publishes no digest, and nothing is pinned."""
    catalog = _catalog(tmp_path)
    mirror = _mirror(tmp_path)
    digests = {p: hashlib.sha256(d).hexdigest() for p, d in FILES.items()}
    if listing == "SHA256SUMS":
        lines = [f"{h}  {p}" if i % 2 else f"{h} *./{p}" for i, (p, h) in enumerate(digests.items())]
        (mirror / listing).write_text("# sha256sum models/*\n\n" + "\n".join(lines) + "\n")
    else:
        (mirror / listing).write_text(json.dumps({p: {"sha256": h, "size_bytes": len(FILES[p])} for p, h in digests.items()}))
    _flip_one_byte(mirror / "models/controlnet_3d_rflow-ct.pt")
    dest = tmp_path / "nvidia"
    with pytest.raises(ChecksumError, match="controlnet_3d_rflow-ct.pt"):
        fetch_weights("rflow-ct", dest, mirror=mirror, catalog=catalog)
    assert not (dest / "models/controlnet_3d_rflow-ct.pt").exists()
    assert "models/controlnet_3d_rflow-ct.pt" not in yaml.safe_load((dest / LEDGER).read_text())
    (mirror / "models/controlnet_3d_rflow-ct.pt").write_bytes(FILES["models/controlnet_3d_rflow-ct.pt"])
    paths = fetch_weights("rflow-ct", dest, mirror=mirror, catalog=catalog)
    assert paths["controlnet"].read_bytes() == FILES["models/controlnet_3d_rflow-ct.pt"]
    assert yaml.safe_load((dest / LEDGER).read_text())["models/controlnet_3d_rflow-ct.pt"]["sha256"] == digests["models/controlnet_3d_rflow-ct.pt"]


def test_mirror_digest_list_disagreeing_with_the_catalog_is_refused(tmp_path):
    catalog = _catalog(tmp_path, hashlib.sha256(FILES["models/autoencoder_v1.pt"]).hexdigest())
    mirror = _mirror(tmp_path)
    (mirror / "SHA256SUMS").write_text(f"{'a' * 64}  models/autoencoder_v1.pt\n")
    with pytest.raises(ChecksumError, match="SHA256SUMS"):
        fetch_weights("rflow-ct", tmp_path / "nvidia", mirror=mirror, catalog=catalog)


@pytest.mark.parametrize("text, problem", [
    ("d41d8cd98f00b204e9800998ecf8427e  models/autoencoder_v1.pt\n", r"SHA256SUMS.*line 1"),
    (f"{'a' * 64}  models/autoencoder_v1.pt\n{'b' * 64}  models/autoencoder_v1.pt\n", r"SHA256SUMS.*line 2.*autoencoder_v1.pt.*twice"),
])  # fmt: skip
def test_malformed_mirror_digest_list_names_the_file_and_line(tmp_path, text, problem):
    mirror = _mirror(tmp_path)
    (mirror / "SHA256SUMS").write_text(text)
    with pytest.raises(ValueError, match=problem):
        fetch_weights("rflow-ct", tmp_path / "nvidia", mirror=mirror, catalog=_catalog(tmp_path))


def test_trust_on_first_use_is_said_on_every_fetch(server, tmp_path, capsys, caplog):
    catalog = _catalog(tmp_path, hashlib.sha256(FILES["models/autoencoder_v1.pt"]).hexdigest())
    dest = tmp_path / "nvidia"
    for _ in range(2):  # the first fetch and a later one (digest recorded by then)
        capsys.readouterr()
        caplog.clear()
        fetch_weights("rflow-ct", dest, base_url=server.base_url, catalog=catalog, progress=False)
        err = capsys.readouterr().err
        for path in ("models/diff_unet_3d_rflow-ct.pt", "models/controlnet_3d_rflow-ct.pt"):
            assert f"trust on first use: no published digest for {path}" in err
            assert f"trust on first use: no published digest for {path}" in caplog.text
        assert "models/autoencoder_v1.pt" not in err  # its digest is published


def test_truncated_file_is_never_pinned(server, tmp_path):
    """Where the catalog gives a size, a mirror file or a download of another size is refused before it is placed
    or pinned (the server's Content-Length announces the short size: refused before its body is read)."""
    _catalog(tmp_path)
    raw = yaml.safe_load((tmp_path / "catalog.yaml").read_text())
    for entry in raw["files"]:
        entry["size_bytes"] = len(FILES[entry["path"]])
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw))
    catalog = load_weights_catalog(tmp_path / "catalog.yaml")
    short = {p: d[:-7] if "diff_unet" in p else d for p, d in FILES.items()}
    mirror = _mirror(tmp_path, short)
    dest = tmp_path / "nvidia"
    with pytest.raises(ChecksumError, match=r"size in bytes.*diff_unet_3d_rflow-ct.pt"):
        fetch_weights("rflow-ct", dest, mirror=mirror, catalog=catalog)
    assert not (dest / "models/diff_unet_3d_rflow-ct.pt").exists()
    assert "models/diff_unet_3d_rflow-ct.pt" not in yaml.safe_load((dest / LEDGER).read_text())
    server.add("nvidia/NV-Generate-CT/resolve/main/models/diff_unet_3d_rflow-ct.pt", short["models/diff_unet_3d_rflow-ct.pt"])
    with pytest.raises(ChecksumError, match=r"size in bytes.*diff_unet_3d_rflow-ct.pt"):
        fetch_weights("rflow-ct", dest, base_url=server.base_url, catalog=catalog, progress=False, retries=0)
    assert not (dest / "models/diff_unet_3d_rflow-ct.pt").exists()
    assert "models/diff_unet_3d_rflow-ct.pt" not in yaml.safe_load((dest / LEDGER).read_text())
    # A body cut short (Content-Length says more than arrives), with no size in the catalog: never placed either.
    server.add("nvidia/NV-Generate-CT/resolve/main/models/diff_unet_3d_rflow-ct.pt", FILES["models/diff_unet_3d_rflow-ct.pt"],
               truncate_after=100, truncate_times=10)  # fmt: skip
    with pytest.raises(DownloadError, match="failed after"):
        fetch_weights("rflow-ct", dest, base_url=server.base_url, catalog=_catalog(tmp_path), progress=False, retries=0)
    assert not (dest / "models/diff_unet_3d_rflow-ct.pt").exists()
    assert "models/diff_unet_3d_rflow-ct.pt" not in yaml.safe_load((dest / LEDGER).read_text())

"""facems.protocols.retrieval: the four readers on the synthetic CUB set and tiny fake Cars/SOP/In-Shop layouts,
the image pipeline against torchvision's geometry, and the embeddings against a direct forward pass."""

from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import pytest
import scipy.io
import torch
from torch import nn

from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import CUB_IDS, write_cub_like
from facems.metrics import retrieval_metrics
from facems.protocols.retrieval import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECALL_KS,
    RetrievalImages,
    embed_split,
    evaluate_embeddings,
    evaluate_retrieval,
    read_cars,
    read_cub,
    read_inshop,
    read_retrieval_dataset,
    read_sop,
    resize_center_crop,
)


def _write_image(path: str, rng: np.random.Generator, h: int = 40, w: int = 52) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    write_cub_like(root, SyntheticFaces(20, 4, 0, identity_offset=CUB_IDS))
    return root


# ----------------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------------


def test_read_cub_synthetic(cub_root: str) -> None:
    ds = read_cub(cub_root)
    assert ds.name == "cub" and ds.same_set and ds.gallery is None and ds.ks == (1, 2, 4, 8)
    assert len(ds.train) == len(ds.query) == 40
    assert set(ds.train.labels.tolist()) == set(range(1, 11))
    assert set(ds.query.labels.tolist()) == set(range(11, 21))
    # independent re-reading: image id -> (path, class), split by class id <= 10
    base = os.path.join(cub_root, "CUB_200_2011")
    with open(os.path.join(base, "images.txt")) as f:
        paths = dict(line.split() for line in f if line.strip())
    with open(os.path.join(base, "image_class_labels.txt")) as f:
        classes = {k: int(v) for k, v in (line.split() for line in f if line.strip())}
    test_ids = sorted((int(k) for k, c in classes.items() if c > 10))
    assert list(ds.query.paths) == [
        os.path.abspath(os.path.join(base, "images", paths[str(i)])) for i in test_ids
    ]
    assert ds.query.labels.tolist() == [classes[str(i)] for i in test_ids]
    assert all(os.path.isfile(p) for p in ds.query.paths + ds.train.paths)
    assert read_cub(base).query.paths == ds.query.paths  # the data set folder itself also works


def _fake_cub(root: str, images: list[str], labels: list[str]) -> str:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "images.txt"), "w") as f:
        f.write("\n".join(images) + "\n")
    with open(os.path.join(root, "image_class_labels.txt"), "w") as f:
        f.write("\n".join(labels) + "\n")
    return root


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (["1 a.jpg", "2 b.jpg extra"], ["1 1", "2 2"], r"images\.txt:2: expected 2"),
        (["1 a.jpg", "x b.jpg"], ["1 1", "2 2"], r"images\.txt:2: image_id 'x'"),
        (["1 a.jpg", "1 b.jpg"], ["1 1", "2 2"], r"images\.txt:2: image_id 1 listed twice"),
        (["1 a.jpg", "2 b.jpg"], ["1 1", "3 2"], r"image_class_labels\.txt:2: image_id 3 is not in"),
        (["1 a.jpg", "2 b.jpg"], ["1 1"], r"no class for image_id 2"),
        (["1 a.jpg", "2 b.jpg"], ["1 1", "2 3"], r"class ids 1\.\.2 without gaps"),
    ],
)
def test_read_cub_malformed(tmp_path, images: list[str], labels: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        read_cub(_fake_cub(str(tmp_path / "cub"), images, labels))


def test_read_cub_missing(tmp_path) -> None:
    root = _fake_cub(str(tmp_path), ["1 a.jpg"], ["1 1"])
    os.remove(os.path.join(root, "image_class_labels.txt"))
    with pytest.raises(FileNotFoundError, match="image_class_labels"):
        read_cub(root)
    with pytest.raises(FileNotFoundError, match=r"CUB_200_2011/images\.txt"):
        read_cub(str(tmp_path / "empty"))


def _cars_mat(path: str, rows: list[tuple[str, int, int]], fields: tuple[str, ...] | None = None) -> None:
    names = fields or ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    ann = np.zeros((1, len(rows)), dtype=[(n, "O") for n in names])
    for i, (rel, cls, test) in enumerate(rows):
        values = {"relative_im_path": rel, "bbox_x1": 1, "bbox_y1": 2, "bbox_x2": 30, "bbox_y2": 20}
        values.update({"class": np.uint8(cls), "test": np.uint8(test)})
        for n in names:
            ann[0, i][n] = np.array([[values[n]]]) if n != "relative_im_path" else np.array([values[n]])
    scipy.io.savemat(path, {"annotations": ann, "class_names": np.array(["a", "b", "c", "d"], dtype=object)})


def test_read_cars(tmp_path) -> None:
    rows = [(f"car_ims/{i:06d}.jpg", c, i % 2) for i, c in enumerate([1, 3, 2, 4, 4, 1, 3], start=1)]
    _cars_mat(str(tmp_path / "cars_annos.mat"), rows)
    ds = read_cars(str(tmp_path))
    assert ds.name == "cars" and ds.same_set and ds.ks == (1, 2, 4, 8)
    # classes 1..2 train, 3..4 test, whatever the 'test' flag says; file order kept
    assert ds.train.labels.tolist() == [1, 2, 1]
    assert ds.query.labels.tolist() == [3, 4, 4, 3]
    assert [os.path.basename(p) for p in ds.query.paths] == [
        "000002.jpg",
        "000004.jpg",
        "000005.jpg",
        "000007.jpg",
    ]
    assert ds.query.paths[0] == os.path.join(str(tmp_path), "car_ims", "000002.jpg")


def test_read_cars_malformed(tmp_path) -> None:
    _cars_mat(
        str(tmp_path / "cars_annos.mat"), [("car_ims/1.jpg", 1, 0)], fields=("relative_im_path", "test")
    )
    with pytest.raises(ValueError, match=r"cars_annos\.mat: annotations lack the field 'class'"):
        read_cars(str(tmp_path))
    scipy.io.savemat(str(tmp_path / "cars_annos.mat"), {"something": np.arange(3)})
    with pytest.raises(ValueError, match="struct array 'annotations'"):
        read_cars(str(tmp_path))
    with open(tmp_path / "cars_annos.mat", "wb") as f:
        f.write(b"not a mat file at all")
    with pytest.raises(ValueError, match=r"cars_annos\.mat"):
        read_cars(str(tmp_path))


def _ebay(
    path: str, rows: list[tuple[int, int, str]], header: str = "image_id class_id super_class_id path"
) -> None:
    with open(path, "w") as f:
        f.write(header + "\n")
        for i, (cls, sup, rel) in enumerate(rows, start=1):
            f.write(f"{i} {cls} {sup} {rel}\n")


def test_read_sop(tmp_path) -> None:
    _ebay(
        str(tmp_path / "Ebay_train.txt"), [(1, 1, "bicycle_final/a_0.JPG"), (1, 1, "bicycle_final/a_1.JPG")]
    )
    _ebay(
        str(tmp_path / "Ebay_test.txt"),
        [(7, 2, "chair_final/b_0.JPG"), (8, 2, "chair_final/c_0.JPG"), (7, 2, "x.JPG")],
    )
    ds = read_sop(str(tmp_path))
    assert ds.name == "sop" and ds.same_set and ds.ks == (1, 10, 100, 1000)
    assert ds.train.labels.tolist() == [1, 1]
    assert ds.query.labels.tolist() == [7, 8, 7]
    assert ds.query.paths[1] == os.path.join(str(tmp_path), "chair_final", "c_0.JPG")


def test_read_sop_malformed(tmp_path) -> None:
    _ebay(str(tmp_path / "Ebay_train.txt"), [(1, 1, "a.JPG")])
    _ebay(str(tmp_path / "Ebay_test.txt"), [(1, 1, "a.JPG")], header="id class path")
    with pytest.raises(ValueError, match=r"Ebay_test\.txt:1: expected the header"):
        read_sop(str(tmp_path))
    with open(tmp_path / "Ebay_test.txt", "w") as f:
        f.write("image_id class_id super_class_id path\n1 1 1 a.JPG\n2 two 1 b.JPG\n")
    with pytest.raises(ValueError, match=r"Ebay_test\.txt:3: class_id 'two'"):
        read_sop(str(tmp_path))
    os.remove(tmp_path / "Ebay_train.txt")
    with pytest.raises(FileNotFoundError, match="Ebay_train"):
        read_sop(str(tmp_path))


def _inshop(root: str, rows: list[tuple[str, str, str]], count: int | None = None, folder: str = "") -> None:
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    with open(os.path.join(root, folder, "list_eval_partition.txt"), "w") as f:
        f.write(f"{len(rows) if count is None else count}\nimage_name item_id evaluation_status\n")
        for r in rows:
            f.write("  ".join(r) + "\n")


INSHOP_ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
    ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
    ("img/MEN/Denim/id_00000081/01_1_front.jpg", "id_00000081", "gallery"),
    ("img/MEN/Denim/id_00000081/01_3_back.jpg", "id_00000081", "query"),
]


def test_read_inshop(tmp_path) -> None:
    _inshop(str(tmp_path), INSHOP_ROWS, folder="Eval")
    os.makedirs(tmp_path / "Img" / "img")
    ds = read_inshop(str(tmp_path))
    assert ds.name == "inshop" and not ds.same_set and ds.ks == (1, 10, 20, 30, 40, 50)
    assert ds.train.labels.tolist() == [2, 2]
    assert ds.query.labels.tolist() == [80, 81]
    assert ds.gallery is not None and ds.gallery.labels.tolist() == [80, 81]
    assert ds.query.paths[1] == os.path.join(str(tmp_path), "Img", "img/MEN/Denim/id_00000081/01_3_back.jpg")


@pytest.mark.parametrize(
    ("rows", "count", "match"),
    [
        (INSHOP_ROWS, 7, r"list_eval_partition\.txt:1: announces 7 images, the file lists 6"),
        ([*INSHOP_ROWS[:5], ("img/a.jpg", "item_81", "query")], None, r":8: item_id 'item_81'"),
        ([*INSHOP_ROWS[:5], ("img/a.jpg", "id_00000081", "test")], None, r":8: evaluation_status 'test'"),
        ([*INSHOP_ROWS[:4], ("img/a.jpg", "id_1")], None, r":7: expected 3 whitespace-separated fields"),
        (INSHOP_ROWS[:3], None, "no gallery images"),
    ],
)
def test_read_inshop_malformed(tmp_path, rows, count, match: str) -> None:
    _inshop(str(tmp_path), rows, count)
    with pytest.raises(ValueError, match=match):
        read_inshop(str(tmp_path))


def test_read_retrieval_dataset_warns_on_counts(cub_root: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="facems.protocols.retrieval"):
        ds = read_retrieval_dataset("cub", cub_root)
    assert len(ds.query) == 40
    assert "differ from the official" in caplog.text
    with pytest.raises(ValueError, match="expected one of cub, cars, sop, inshop"):
        read_retrieval_dataset("mnist", cub_root)
    assert RECALL_KS["sop"] == (1, 10, 100, 1000)


# ----------------------------------------------------------------------------------------------------
# images and embeddings
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(300, 500), (500, 300), (256, 256), (180, 200)])
def test_resize_center_crop_matches_torchvision_geometry(h: int, w: int) -> None:
    tf = pytest.importorskip("torchvision.transforms.functional")
    # A smooth image (both filters agree closely on it) with a distinct value at every position.
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (h + w - 2)], axis=2).astype(
        np.uint8
    )
    out = resize_center_crop(img, 256, 224)
    ref = tf.center_crop(tf.resize(torch.from_numpy(img).permute(2, 0, 1), [256], antialias=True), [224, 224])
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(np.int32) - ref.permute(1, 2, 0).numpy().astype(np.int32))
    assert (
        diff.mean() < 1.0 and diff.max() <= 4
    )  # a one-pixel shift of the crop would give ~1 per pixel per channel


def test_resize_center_crop_rejects_small_resize() -> None:
    with pytest.raises(ValueError, match="resize >= crop"):
        resize_center_crop(np.zeros((10, 10, 3), np.uint8), 100, 112)


def test_retrieval_images_decode_and_errors(tmp_path) -> None:
    rng = np.random.default_rng(0)
    _write_image(str(tmp_path / "a.png"), rng, 30, 40)
    grey = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    ds = RetrievalImages(
        [str(tmp_path / "a.png"), str(tmp_path / "g.png"), str(tmp_path / "none.png")], 20, 16
    )
    x = ds[0]
    bgr = cv2.imread(str(tmp_path / "a.png"))
    want = resize_center_crop(bgr, 20, 16)[:, :, ::-1].transpose(2, 0, 1)  # RGB, CHW
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
    np.testing.assert_array_equal(x.numpy(), want)
    g = ds[1].numpy()
    np.testing.assert_array_equal(g[0], g[1])
    with pytest.raises(OSError, match=r"none\.png"):
        ds[2]


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean(dim=(2, 3)))


@pytest.mark.parametrize(("normalize", "flip", "workers"), [("imagenet", False, 0), ("face", True, 2)])
def test_embed_split_matches_direct_forward(cub_root: str, normalize: str, flip: bool, workers: int) -> None:
    ds = read_cub(cub_root)
    model = _TinyNet().eval()
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else ((0.5,) * 3, (0.5,) * 3)
    got = embed_split(
        model, ds.query, batch_size=16, resize=64, crop=56, mean=mean, std=std, flip=flip, num_workers=workers
    )
    # the same by hand: decode, resize the shorter side to 64, centre crop 56, standardise in float64
    images = []
    for p in ds.query.paths:
        rgb = cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB)
        images.append(resize_center_crop(rgb, 64, 56))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double() / 255
    x = (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(x.float())
        if flip:
            want = want + model(x.flip(3).float())
    assert got.shape == (len(ds.query), 5)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_evaluate_retrieval_equals_metrics_on_its_embeddings(cub_root: str) -> None:
    ds = read_cub(cub_root)
    model = _TinyNet()
    r = evaluate_retrieval(model, ds, resize=64, crop=56, num_workers=0, ks=(1, 2))
    emb = embed_split(model, ds.query, resize=64, crop=56, num_workers=0)
    assert r.metrics == retrieval_metrics(emb, None, ds.query.labels, None, ks=(1, 2))
    assert (r.num_queries, r.num_references, r.embedding_dim, r.ks) == (40, 40, 5, (1, 2))
    assert set(r.to_dict()["metrics"]) == {"recall@1", "recall@2", "map@r", "r_precision"}


def test_evaluate_embeddings_query_gallery(tmp_path) -> None:
    _inshop(str(tmp_path), INSHOP_ROWS)
    ds = read_inshop(str(tmp_path))
    assert ds.gallery is not None
    # gallery 80, 81; query 80 points at 81's gallery image, query 81 at its own
    query = np.array([[0.0, 1.0], [0.1, 1.0]])
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    r = evaluate_embeddings(ds, query, gallery, ks=(1, 10))
    assert r.metrics["recall@1"] == 0.5 and r.metrics["recall@10"] == 1.0
    assert (r.num_queries, r.num_references) == (2, 2)
    with pytest.raises(ValueError, match="has a gallery"):
        evaluate_embeddings(ds, query)

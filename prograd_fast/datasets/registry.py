"""The data sets of CoOp's DATASETS.md by name: folder, on-disk layout, template key."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DatasetSpec", "DATASETS", "get_spec", "DatasetError", "FEWSHOT_DATASETS",
           "IMAGENET_SHIFTS"]


class DatasetError(ValueError):
    """A data set on disk is missing or not in the expected layout (one line: the file and
    what was expected)."""


@dataclass(frozen=True)
class DatasetSpec:
    """One data set: ``name`` (CoOp's config name, used on the command line), ``dassl`` (its
    Dassl class name, which keys the teacher templates), ``title`` (for tables), ``folder``
    under the data root, ``layout`` (how it is read, see :mod:`.readers`), ``image_dir`` under
    the folder, ``split_file`` (CoOp's split JSON, for ``layout == "split_json"``) and
    ``test_only`` (ImageNet's shifted test sets)."""

    name: str
    dassl: str
    title: str
    folder: str
    layout: str
    image_dir: str
    split_file: str | None = None
    test_only: bool = False

    def expected(self) -> str:
        """The layout in words, for error messages."""
        f = self.folder
        if self.layout == "split_json":
            images = f"{f}/{self.image_dir}/" if self.image_dir else f"{f}/cars_train/, {f}/cars_test/"
            return f"{images} and {f}/{self.split_file}"
        if self.layout == "fgvc":
            return f"{f}/images/, {f}/variants.txt and {f}/images_variant_{{train,val,test}}.txt"
        if self.layout == "imagenet":
            return f"{f}/images/train/<wnid>/, {f}/images/val/<wnid>/ and {f}/classnames.txt"
        if self.layout == "imagenet_numbered":
            return f"{f}/{self.image_dir}/<0..N-1>/ and {f}/classnames.txt"
        return f"{f}/{self.image_dir}/<wnid>/ and {f}/classnames.txt"


def _split(name, dassl, title, folder, image_dir):
    return DatasetSpec(name, dassl, title, folder, "split_json", image_dir,
                       f"split_zhou_{dassl}.json")


_ALL = [
    DatasetSpec("imagenet", "ImageNet", "ImageNet", "imagenet", "imagenet", "images"),
    _split("caltech101", "Caltech101", "Caltech101", "caltech-101", "101_ObjectCategories"),
    _split("oxford_pets", "OxfordPets", "OxfordPets", "oxford_pets", "images"),
    # StanfordCars' split paths start at the folder itself (cars_train/..., cars_test/...)
    _split("stanford_cars", "StanfordCars", "StanfordCars", "stanford_cars", ""),
    _split("oxford_flowers", "OxfordFlowers", "Flowers102", "oxford_flowers", "jpg"),
    _split("food101", "Food101", "Food101", "food-101", "images"),
    DatasetSpec("fgvc_aircraft", "FGVCAircraft", "FGVCAircraft", "fgvc_aircraft", "fgvc", "images"),
    _split("sun397", "SUN397", "SUN397", "sun397", "SUN397"),
    _split("dtd", "DescribableTextures", "DTD", "dtd", "images"),
    _split("eurosat", "EuroSAT", "EuroSAT", "eurosat", "2750"),
    _split("ucf101", "UCF101", "UCF101", "ucf101", "UCF-101-midframes"),
    DatasetSpec("imagenetv2", "ImageNetV2", "ImageNet-V2", "imagenetv2", "imagenet_numbered",
                "imagenetv2-matched-frequency-format-val", test_only=True),
    DatasetSpec("imagenet_sketch", "ImageNetSketch", "ImageNet-Sketch", "imagenet-sketch",
                "imagenet_folders", "images", test_only=True),
    DatasetSpec("imagenet_a", "ImageNetA", "ImageNet-A", "imagenet-adversarial", "imagenet_folders",
                "imagenet-a", test_only=True),
    DatasetSpec("imagenet_r", "ImageNetR", "ImageNet-R", "imagenet-rendition", "imagenet_folders",
                "imagenet-r", test_only=True),
]

#: name -> spec, in CoOp's order.
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in _ALL}

#: The 11 data sets of the few-shot and base-to-new tables.
FEWSHOT_DATASETS: tuple[str, ...] = tuple(s.name for s in _ALL if not s.test_only)

#: ImageNet's shifted test sets (domain generalisation targets).
IMAGENET_SHIFTS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def get_spec(name: str) -> DatasetSpec:
    """The spec of a data set by CoOp's config name (``oxford_pets``); also accepts the Dassl
    class name (``OxfordPets``)."""
    if name in DATASETS:
        return DATASETS[name]
    for spec in _ALL:
        if name.lower() in (spec.dassl.lower(), spec.title.lower()):
            return spec
    raise DatasetError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}")

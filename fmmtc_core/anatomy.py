"""Anatomical groups of atlas regions by name: HCP-MMP sections, lobes, subcortical structures.

Two groupings are offered, both decided from a region's *name*, so the left and right copies of
an area always land in the same group:

``section``
    For HCP-MMP 1.0 areas (Glasser et al., 2016), the atlas's own 22 cortical sections of the
    paper's Supplementary Neuroanatomical Results (Table 1: "Primary Visual", "Somatosensory and
    Motor", "Posterior Opercular", ...), read from ``data/hcp_mmp_sections.tsv``; for the
    subcortical regions HCPEx adds, their structure ("Thalamus", "Striatum", "Pallidum",
    "Amygdala", "Midbrain", "Hypothalamus", "Basal forebrain").
``lobe``
    A coarser view derived from the section: each section has the lobe most of its areas lie
    in (:data:`SECTION_LOBES`), and the few areas of a section that straddles a lobe boundary
    say where they lie themselves (:data:`AREA_LOBES`: area 4 is on the precentral gyrus,
    frontal, while 3a, 3b, 1 and 2 are postcentral, parietal; OP1 / SII is on the parietal
    operculum; IPS1 is in the intraparietal sulcus). Subcortical structures are
    ``"Subcortical"``. The lobe names are those the package has always used (:data:`LOBES`),
    so figures, the explorer and stored screenings keep their vocabulary.

Region names are recognised in the two spellings in use: HCPEx's (``Area_OP1-SII_L``, case
ignored) and the HCP-MMP label files' (``L_OP1_ROI``). Atlases whose names are neither (AAL3,
most user atlases) get lobes from :mod:`fmmtc_core.atlas` and no sections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = [
    "HCP_MMP_SECTIONS",
    "SUBCORTICAL_STRUCTURES",
    "SECTION_LOBES",
    "AREA_LOBES",
    "LOBES",
    "GROUPINGS",
    "RegionAnatomy",
    "hcp_mmp_areas",
    "region_anatomy",
]

#: The 22 cortical sections of HCP-MMP 1.0, numbered as in Glasser et al. (2016),
#: Supplementary Neuroanatomical Results, Table 1 (section ``k`` is ``HCP_MMP_SECTIONS[k - 1]``).
HCP_MMP_SECTIONS: tuple[str, ...] = (
    "Primary Visual",
    "Early Visual",
    "Dorsal Stream Visual",
    "Ventral Stream Visual",
    "MT+ Complex and Neighboring Visual Areas",
    "Somatosensory and Motor",
    "Paracentral Lobular and Mid Cingulate",
    "Premotor",
    "Posterior Opercular",
    "Early Auditory",
    "Auditory Association",
    "Insular and Frontal Opercular",
    "Medial Temporal",
    "Lateral Temporal",
    "Temporo-Parieto-Occipital Junction",
    "Superior Parietal",
    "Inferior Parietal",
    "Posterior Cingulate",
    "Anterior Cingulate and Medial Prefrontal",
    "Orbital and Polar Frontal",
    "Inferior Frontal",
    "DorsoLateral Prefrontal",
)

#: The subcortical structures of HCPEx's 66 extension regions (33 per hemisphere), by name
#: prefix (case ignored), first match wins.
_SUBCORTICAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("Thal_", "Thalamus"),
    ("Putamen", "Striatum"),
    ("Caudate", "Striatum"),
    ("Nucleus_Accumbens", "Striatum"),
    ("Globus_pallidus", "Pallidum"),
    ("Amygdala", "Amygdala"),
    ("Substantia_nigra", "Midbrain"),
    ("Ventral_tegmenta", "Midbrain"),  # sic: HCPEx spells it "Ventral_tegmenta_area"
    ("Mammillary_bodies", "Hypothalamus"),
    ("Septal_nucleus", "Basal forebrain"),
    ("Nuclei_basal", "Basal forebrain"),  # the nucleus basalis (of Meynert)
)
#: Subcortical structure names, in display order.
SUBCORTICAL_STRUCTURES: tuple[str, ...] = tuple(dict.fromkeys(s for _, s in _SUBCORTICAL_PREFIXES))

#: The coarse groups (lobes and beyond) used for every atlas, HCP-MMP or not.
LOBES: tuple[str, ...] = ("Frontal", "Parietal", "Temporal", "Occipital", "Insula", "Cingulate",
                          "Limbic", "Subcortical", "Cerebellum", "Other", "Unassigned")

#: The lobe of most areas of each section; :data:`AREA_LOBES` names the exceptions.
SECTION_LOBES: dict[str, str] = {
    "Primary Visual": "Occipital",
    "Early Visual": "Occipital",
    "Dorsal Stream Visual": "Occipital",
    "Ventral Stream Visual": "Occipital",
    "MT+ Complex and Neighboring Visual Areas": "Occipital",
    "Somatosensory and Motor": "Parietal",
    "Paracentral Lobular and Mid Cingulate": "Frontal",
    "Premotor": "Frontal",
    "Posterior Opercular": "Parietal",
    "Early Auditory": "Temporal",
    "Auditory Association": "Temporal",
    "Insular and Frontal Opercular": "Insula",
    "Medial Temporal": "Limbic",  # hippocampus, subiculum, entorhinal and parahippocampal areas
    "Lateral Temporal": "Temporal",
    "Temporo-Parieto-Occipital Junction": "Temporal",
    "Superior Parietal": "Parietal",
    "Inferior Parietal": "Parietal",
    "Posterior Cingulate": "Cingulate",
    "Anterior Cingulate and Medial Prefrontal": "Cingulate",
    "Orbital and Polar Frontal": "Frontal",
    "Inferior Frontal": "Frontal",
    "DorsoLateral Prefrontal": "Frontal",
}

#: Areas whose lobe differs from their section's (the section straddles a lobe boundary).
AREA_LOBES: dict[str, str] = {
    # Dorsal stream visual: the intraparietal sulcus and the parietal bank of the
    # parieto-occipital sulcus.
    "IPS1": "Parietal", "V6A": "Parietal",
    # Ventral stream visual: on the fusiform gyrus / inferotemporal cortex.
    "FFC": "Temporal", "PIT": "Temporal",
    # MT+ complex: MT, MST and FST lie in the posterior superior / inferior temporal sulci (the
    # lateral occipital areas LO1-3, V3CD, V4t and PH keep the section's lobe).
    "MT": "Temporal", "MST": "Temporal", "FST": "Temporal",
    # Somatosensory and motor: M1 lies on the precentral gyrus (3a, 3b, 1, 2 are postcentral).
    "4": "Frontal",
    # Paracentral lobule and mid cingulate: cingulate motor areas and the parietal area 5.
    "24dd": "Cingulate", "24dv": "Cingulate", "23c": "Cingulate",
    "5m": "Parietal", "5mv": "Parietal", "5L": "Parietal",
    # Posterior opercular: the first frontal opercular area.
    "FOP1": "Frontal",
    # Early auditory: PFcm belongs to the parietal operculum's PF complex.
    "PFcm": "Parietal",
    # Insular and frontal opercular: the frontal operculum and the (olfactory) piriform cortex.
    "FOP2": "Frontal", "FOP3": "Frontal", "FOP4": "Frontal", "FOP5": "Frontal",
    "Pir": "Limbic",
    # Posterior cingulate: precuneus and parieto-occipital sulcus areas; prostriate cortex.
    "7m": "Parietal", "PCV": "Parietal", "POS1": "Parietal", "POS2": "Parietal",
    "DVT": "Parietal", "ProS": "Occipital",
    # Anterior cingulate and medial prefrontal: the medial and orbital prefrontal areas.
    "8BM": "Frontal", "9m": "Frontal", "10r": "Frontal", "10v": "Frontal", "pOFC": "Frontal",
}

#: The groupings a page can offer: key -> title (the column / axis title that says what it is).
GROUPINGS: dict[str, str] = {
    "lobe": "Lobe",
    "section": "HCP-MMP section / subcortical structure",
}

_TABLE = Path(__file__).parent / "data" / "hcp_mmp_sections.tsv"


@dataclass(frozen=True)
class RegionAnatomy:
    """Where a named region lies.

    Attributes
    ----------
    section : str
        Its HCP-MMP section (one of :data:`HCP_MMP_SECTIONS`) or subcortical structure (one
        of :data:`SUBCORTICAL_STRUCTURES`).
    lobe : str
        Its lobe, ``"Subcortical"`` for a subcortical structure (one of :data:`LOBES`).
    area : str or None
        Its HCP-MMP area name (``"OP1"``); None for a subcortical structure.
    """

    section: str
    lobe: str
    area: str | None = None


@lru_cache(maxsize=1)
def _table() -> tuple[dict[str, str], dict[str, str]]:
    """(HCPEx name in lower case -> area, area -> section name), read once."""
    by_hcpex: dict[str, str] = {}
    section_of: dict[str, str] = {}
    lines = [ln for ln in _TABLE.read_text(encoding="utf-8").splitlines()
             if ln.strip() and not ln.startswith("#")]
    for ln in lines[1:]:  # the header row
        number, area, hcpex = ln.split("\t")
        section_of[area] = HCP_MMP_SECTIONS[int(number) - 1]
        by_hcpex[hcpex.lower()] = area
    return by_hcpex, section_of


def hcp_mmp_areas() -> dict[str, str]:
    """Every HCP-MMP 1.0 area with its section.

    Returns
    -------
    dict of str to str
        Area name (Glasser et al., 2016: ``"V1"``, ``"3b"``, ``"OP1"`` ...) -> section name
        (:data:`HCP_MMP_SECTIONS`), the 180 areas of one hemisphere in HCPEx's order.
    """
    return dict(_table()[1])


# HCPEx: "<name>_L" / "<name>_R"; HCP-MMP label files: "L_<area>_ROI" / "R_<area>_ROI".
_HCPEX_NAME = re.compile(r"^(?P<base>.+)_[LR]$", re.IGNORECASE)
_MMP_NAME = re.compile(r"^(?:L|R)_(?P<area>.+)_ROI$")


def region_anatomy(name: str) -> RegionAnatomy | None:
    """The section and lobe of a region, recognised by its name.

    Parameters
    ----------
    name : str
        A region name: an HCPEx name (``"Area_OP1-SII_L"``, case ignored) or an HCP-MMP label
        name (``"L_OP1_ROI"``).

    Returns
    -------
    RegionAnatomy or None
        The region's section, lobe and (cortex) area; None when the name is neither an
        HCP-MMP area nor one of HCPEx's subcortical regions. The left and right names of an
        area give the same answer.
    """
    by_hcpex, section_of = _table()
    m = _MMP_NAME.match(name)
    area = m.group("area") if m else None
    if area not in section_of:
        m = _HCPEX_NAME.match(name)
        if m is None:
            return None
        base = m.group("base").lower()
        area = by_hcpex.get(base)
        if area is None:
            for prefix, structure in _SUBCORTICAL_PREFIXES:
                if base.startswith(prefix.lower()):
                    return RegionAnatomy(section=structure, lobe="Subcortical")
            return None
    section = section_of[area]
    return RegionAnatomy(section=section, lobe=AREA_LOBES.get(area, SECTION_LOBES[section]),
                         area=area)

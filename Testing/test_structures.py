import json

import numpy as np
import pytest

from HeartCompletionLib.structures.conventions import apply_convention, load_convention
from HeartCompletionLib.structures.table import StructureTable


def test_default_table_matches_design():
    table = StructureTable.default()
    assert table.names == ["Myocardium", "LA", "LV", "RA", "RV", "Aorta", "PA", "LAA", "Coronary", "PV"]
    assert table.labels == list(range(1, 11))
    codes = {s.name: s.snomed_code for s in table}
    assert codes == {
        "Myocardium": "74281007", "LA": "82471001", "LV": "87878005", "RA": "73829009", "RV": "53085002",
        "Aorta": "15825003", "PA": "81040000", "LAA": "33626005", "Coronary": "41801008", "PV": "122972007",
    }
    assert all(s.index == s.label - 1 for s in table)


@pytest.mark.parametrize(
    "name, expected",
    [("left ventricle", "LV"), ("LV blood pool", "LV"), ("heart_ventricle_left", "LV"), ("Heart-Atrium_Left", "LA"),
     ("atrial_appendage_left", "LAA"), ("pulmonary_vein", "PV"), ("coronary arteries", "Coronary"),
     ("heart_myocardium", "Myocardium"), ("pulmonary_artery", "PA"), ("AORTA", "Aorta")],
)
def test_synonyms(name, expected):
    assert StructureTable.default().match_name(name).name == expected


def test_unknown_name_is_none_and_by_name_raises():
    table = StructureTable.default()
    assert table.match_name("spleen") is None
    with pytest.raises(KeyError, match="spleen"):
        table.by_name("spleen")


def test_terminology_codes_including_totalsegmentator_laa():
    table = StructureTable.default()
    assert table.match_terminology("87878005").name == "LV"
    assert table.match_terminology("68786006", "7771000").name == "LAA"
    assert table.match_terminology("68786006", "7771001") is None
    assert table.match_terminology("12345") is None


def test_extended_table_keeps_first_ten(repo_root):
    ext = StructureTable.from_json(repo_root / "training" / "configs" / "structures_16.json")
    assert len(ext) == 16
    assert ext.names[:10] == StructureTable.default().names
    assert ext.match_name("superior vena cava").label == 11


def test_round_trip_and_compatibility():
    table = StructureTable.default()
    again = StructureTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again == table and again.is_compatible(table)


def test_bad_tables_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"structures": [{"label": 2, "name": "X"}]}))
    with pytest.raises(ValueError, match="labels must be 1..K"):
        StructureTable.from_json(bad)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"structures": [{"label": 1, "name": "A", "synonyms": ["x"]},
                                              {"label": 2, "name": "B", "synonyms": ["x"]}]}))
    with pytest.raises(ValueError, match="used by both"):
        StructureTable.from_json(dup)


def test_mmwhs_convention_maps_values_and_warns_on_unknown():
    table = StructureTable.default()
    src = np.array([[[0, 205, 420], [500, 550, 600]], [[820, 850, 421], [0, 0, 0]]], dtype=np.int32)
    with pytest.warns(UserWarning, match="421"):
        out = apply_convention(src, table, "mmwhs", source="case.nii.gz")
    assert out.tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 0], [0, 0, 0]]]


def test_json_convention_file(tmp_path):
    table = StructureTable.default()
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"11": "left ventricle", "12": "heart_myocardium", "13": 8}))
    assert load_convention(path, table) == {11: 3, 12: 1, 13: 8}
    path.write_text(json.dumps({"1": "spleen"}))
    with pytest.raises(ValueError, match="spleen"):
        load_convention(path, table)


def test_totalsegmentator_convention():
    table = StructureTable.default()
    assert load_convention("totalsegmentator", table) == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7}

"""Parsers for the sections of a task spec (classes, source, joins, splits, preprocess, retrieval, vqa)."""

from __future__ import annotations

import re

from retbench.spec.reader import Reader
from retbench.spec.schema import (
    DEFAULT_ANSWER_TEMPLATE,
    IMAGE_MODALITIES,
    LABEL_FORMATS,
    SIDE_TYPES,
    SOURCE_KINDS,
    SPLIT_STRATEGIES,
    ClassSpec,
    DirectionSpec,
    JoinSpec,
    QuestionSpec,
    RetrievalSpec,
    SideSpec,
    SourceSpec,
    SplitSpec,
    VQASpec,
)

SOURCE_KEYS = set(SourceSpec.__dataclass_fields__)
SPLIT_KEYS = set(SplitSpec.__dataclass_fields__)
PREPROCESS_KEYS = {"fundus_crop", "resize", "size", "interpolation", "crop_pct", "mean", "std", "grayscale", "normalization",
                   "jpeg_draft", "decoder"}


def check_preprocess(pre: Reader) -> None:
    """Preprocessing hints must make a valid :class:`Preprocess` (bad crop names, sizes...)."""
    from retbench.preprocess import FUNDUS_CROPS, Preprocess

    crop = pre.data.get("fundus_crop", False)
    if not isinstance(crop, bool) and crop not in FUNDUS_CROPS:
        raise pre.fail("fundus_crop", f"expected true/false or one of {', '.join(FUNDUS_CROPS)}, got {crop!r}")
    pre.get("normalization", str, "mean_std", choices=("mean_std", "per_image"))
    pre.get("resize", str, "resize_crop", choices=("resize_crop", "pad_canvas", "squash"))
    pre.get("jpeg_draft", bool, False)
    pre.get("decoder", str, "pil", choices=("pil", "nvjpeg"))
    try:
        Preprocess().with_hints(pre.data)
    except (TypeError, ValueError) as exc:
        raise pre.fail("preprocess", str(exc)) from None


def parse_classes(r: Reader, key: str = "classes", what: str = "class") -> tuple[ClassSpec, ...]:
    """The ``classes`` list (or a question's ``answers``): names, label matches and prompts, at least two."""
    items = r.get(key, list)
    if len(items) < 2:
        raise r.fail(key, f"needs at least 2 {key}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (str, int)) and not isinstance(item, bool):
            item = {"name": item}
        if not isinstance(item, dict):
            raise r.fail(f"{key}[{i}]", f"expected a {what} name or a mapping with name/match/prompts")
        entry = Reader(r.file, item, f"{r.key(key)}[{i}].")
        entry.check_unknown({"name", "match", "prompts"})
        name = str(entry.get("name", (str, int)))
        out.append(ClassSpec(name, entry.strings("match", (name,)), entry.strings("prompts", (name,))))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise r.fail(key, f"duplicate {what} names in {names}")
    owner: dict[str, int] = {}
    for i, c in enumerate(out):
        for value in c.match:
            j = owner.setdefault(value, i)
            if j != i:  # the label mapping would silently give the value to the later class
                raise r.fail(f"{key}[{i}].match", f"label value '{value}' is matched by both {what} '{out[j].name}' "
                             f"({r.key(key)}[{j}]) and {what} '{c.name}'; a value must mean one {what}")
    return tuple(out)



NAME_RE = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*$")


def parse_retrieval(t: Reader, modality: str | None) -> RetrievalSpec:
    """``retrieval: {sides: {<name>: {type, column, ...}}, directions: [<query>_to_<gallery>, ...]}``."""
    t.check_unknown({"sides", "directions"})
    raw_sides = t.get("sides", dict)
    if len(raw_sides) < 2:
        raise t.fail("sides", f"needs at least 2 sides (the two members of a pair), got {len(raw_sides)}")
    sides = []
    for name, item in raw_sides.items():
        name = str(name)
        if not NAME_RE.match(name) or "_to_" in name:
            raise t.fail(f"sides.{name}", "a side name is letters, digits and single underscores, without '_to_'")
        if not isinstance(item, dict):
            raise t.fail(f"sides.{name}", "expected a mapping with type, column (and modality, preprocess or template)")
        sr = Reader(t.file, item, f"{t.key('sides')}.{name}.")
        sr.check_unknown({"type", "column", "modality", "preprocess", "template"})
        typ = sr.get("type", str, "image", choices=SIDE_TYPES)
        column = sr.get("column", str)
        if typ == "image":
            if "template" in item:
                raise sr.fail("template", "only text sides have a template")
            pre = sr.sub("preprocess")
            pre.check_unknown(PREPROCESS_KEYS)
            check_preprocess(pre)
            side_modality = sr.get("modality", str, modality if modality else ..., choices=IMAGE_MODALITIES)
            sides.append(SideSpec(name, typ, column, side_modality, dict(pre.data)))
        else:
            for key in ("modality", "preprocess"):
                if key in item:
                    raise sr.fail(key, "only image sides have a modality and preprocessing")
            template = sr.get("template", str, "{}")
            if template.count("{}") != 1:
                raise sr.fail("template", f"must contain '{{}}' once (where the text goes), got {template!r}")
            sides.append(SideSpec(name, typ, column, template=template))
    if not any(s.type == "image" for s in sides):
        raise t.fail("sides", "needs at least one image side")
    names = [s.name for s in sides]
    directions = []
    for d in t.strings("directions"):
        query, sep, gallery = d.partition("_to_")
        if not sep or query not in names or gallery not in names or query == gallery:
            pairs = [f"{a}_to_{b}" for a in names for b in names if a != b]
            raise t.fail("directions", f"got {d!r}; allowed: {', '.join(pairs)}")
        if "image" not in (sides[names.index(query)].type, sides[names.index(gallery)].type):
            raise t.fail("directions", f"{d!r} ranks texts against texts; a direction needs an image side")
        directions.append(DirectionSpec(d, query, gallery))
    if not directions:
        raise t.fail("directions", "needs at least one direction")
    if len({d.name for d in directions}) != len(directions):
        raise t.fail("directions", "a direction is listed twice")
    return RetrievalSpec(tuple(sides), tuple(directions))


def parse_vqa(v: Reader) -> VQASpec:
    """``vqa: {answer_template, questions: [{name, question, column, answers, bins, missing}, ...]}``."""
    v.check_unknown({"questions", "answer_template"})
    template = v.get("answer_template", str, DEFAULT_ANSWER_TEMPLATE)
    try:
        template.format(question="q", answer="a")
    except (KeyError, IndexError, ValueError) as exc:
        raise v.fail("answer_template", f"only {{question}} and {{answer}} may be filled in, got {template!r} ({exc})") from None
    if "{question}" not in template or "{answer}" not in template:
        raise v.fail("answer_template", f"must contain {{question}} and {{answer}}, got {template!r}")
    items = v.get("questions", list)
    if not items:
        raise v.fail("questions", "needs at least one question")
    questions = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise v.fail(f"questions[{i}]", "expected a mapping with name, question, column and answers")
        q = Reader(v.file, item, f"{v.key('questions')}[{i}].")
        q.check_unknown({"name", "question", "column", "answers", "bins", "missing"})
        name = q.get("name", str)
        if not NAME_RE.match(name):
            raise q.fail("name", f"a question name is letters, digits and single underscores, got {name!r}")
        answers = parse_classes(q, "answers", "answer")
        bins = tuple(float(b) for b in q.get("bins", list, []))
        if bins and len(bins) != len(answers) - 1:
            raise q.fail("bins", f"{len(answers)} answers need {len(answers) - 1} inner bin edges, got {len(bins)}")
        if list(bins) != sorted(bins):
            raise q.fail("bins", "edges must increase")
        questions.append(QuestionSpec(name, q.get("question", str), q.get("column", str), answers, bins,
                                      q.strings("missing", ())))
    names = [q.name for q in questions]
    if len(set(names)) != len(names):
        raise v.fail("questions", f"duplicate question names in {names}")
    return VQASpec(tuple(questions), template)


def parse_source(s: Reader, n_classes: int) -> SourceSpec:
    """The ``source`` section: where the images and labels are and how labels are read."""
    s.check_unknown(SOURCE_KEYS)
    kind = s.get("kind", str, choices=SOURCE_KINDS)
    files = s.get("files", dict, {})
    bins = tuple(float(b) for b in s.get("bins", list, []))
    if bins and len(bins) != n_classes - 1:
        raise s.fail("bins", f"{n_classes} classes need {n_classes - 1} inner bin edges, got {len(bins)}")
    if list(bins) != sorted(bins):
        raise s.fail("bins", "edges must increase")
    patterns = []
    for i, p in enumerate(s.get("patient_patterns", list, [])):
        if not isinstance(p, dict) or "pattern" not in p:
            raise s.fail(f"patient_patterns[{i}]", "expected a mapping with 'pattern' (and optional 'prefix')")
        patterns.append((str(p["pattern"]), str(p.get("prefix", ""))))
    joins = parse_joins(s, kind)
    return SourceSpec(
        kind=kind,
        path=s.get("path", str, "" if files else ...),
        files={str(k): str(v) for k, v in files.items()},
        image_column=s.get("image_column", str, "image"),
        image_root=s.get("image_root", str, None),
        label_column=s.get("label_column", str, "label"),
        label_format=s.get("label_format", str, "value", choices=LABEL_FORMATS),
        bins=bins,
        patient_column=s.get("patient_column", str, None),
        patient_patterns=tuple(patterns),
        split_column=s.get("split_column", str, None),
        split_dirs={str(k): str(v) for k, v in s.get("split_dirs", dict, {}).items()},
        drop_missing_labels=s.get("drop_missing_labels", bool, False),
        drop_conflicting_duplicates=s.get("drop_conflicting_duplicates", bool, False),
        layout=s.get("layout", str, ""),
        download=s.get("download", str, ""),
        join=joins,
    )


def parse_joins(s: Reader, kind: str) -> tuple[JoinSpec, ...]:
    """``join:`` one mapping ``{path, key, join_key, columns}`` or a list of them (CSV sources only).

    (Not ``on``: YAML 1.1 reads a bare ``on`` key as the boolean true.)
    """
    value = s.get("join", (dict, list), [])
    items = [value] if isinstance(value, dict) else value
    if items and kind != "csv":
        raise s.fail("join", f"joins apply to csv sources, this source is '{kind}'")
    out = []
    for i, item in enumerate(items):
        key = "join" if isinstance(value, dict) else f"join[{i}]"
        if not isinstance(item, dict):
            raise s.fail(key, "expected a mapping with path and key (and optional join_key, columns)")
        j = Reader(s.file, {str(k): v for k, v in item.items()}, f"{s.key(key)}.")
        if True in item:
            raise j.fail("on", "YAML 1.1 reads a bare 'on' key as true; name the key column with 'key:' "
                         "(and the joined CSV's with 'join_key:')")
        j.check_unknown({"path", "key", "join_key", "columns"})
        column = j.get("key", str)
        out.append(JoinSpec(j.get("path", str), column, j.get("join_key", str, column), j.strings("columns", ())))
    return tuple(out)


def parse_splits(s: Reader) -> SplitSpec:
    """The ``splits`` section: given or stratified, fractions, seed, patient and near-duplicate grouping."""
    s.check_unknown(SPLIT_KEYS)
    spec = SplitSpec(
        strategy=s.get("strategy", str, "stratified", choices=SPLIT_STRATEGIES),
        test_fraction=s.get("test_fraction", float, 0.2),
        val_fraction=s.get("val_fraction", float, 0.0),
        seed=s.get("seed", int, 0),
        by_patient=s.get("by_patient", bool, True),
        group_near_duplicates=s.get("group_near_duplicates", bool, False),
    )
    if spec.strategy == "stratified" and not 0.0 < spec.test_fraction < 1.0:
        raise s.fail("test_fraction", f"must be in (0, 1), got {spec.test_fraction}")
    if not 0.0 <= spec.val_fraction < 1.0 - spec.test_fraction:
        raise s.fail("val_fraction", f"must be in [0, 1 - test_fraction), got {spec.val_fraction}")
    return spec

"""The built-in synthetic records (films, reports, labels, masks): docs/synthetic-records.md. Record i is drawn from
[seed, i, stream] alone, the same in every process, run and count; streams 0 the case, 1 the phrasing (never looking
at a finding's side, zone or size), 2 the image noise. A PA view: the patient's right is on the image's left."""
import math

import numpy as np
from PIL import Image, ImageFilter

from machinery.console import progress

FINDINGS = ("atelectasis", "cardiomegaly", "consolidation", "pleural effusion", "pneumothorax", "nodule")
FINDING_PROB = 0.25
SIZES = {"atelectasis": ("mild", "moderate"), "cardiomegaly": ("mild", "moderate"),
         "consolidation": ("small", "large"), "pleural effusion": ("small", "moderate", "large"),
         "pneumothorax": ("small", "large")}
MM_PER_IMAGE_WIDTH = 430.0  # a 43 cm detector: nodule sizes in mm become fractions of the image


def synth_case(i: int, seed: int = 0) -> dict:
    """Anatomy and findings of synthetic record i: {'anatomy': {...}, 'findings': {name: {...}}}."""
    rng = np.random.default_rng([seed, i, 0])
    s = rng.uniform(0.93, 1.05)  # body size
    anatomy = dict(cx=0.5 + rng.normal(0, 0.01), top=0.14 + rng.normal(0, 0.01), s=s, base=0.74 + rng.normal(0, 0.015),
                   ctr=rng.uniform(0.40, 0.48), gamma=rng.uniform(0.8, 1.25), tissue=rng.uniform(0.35, 0.45))
    findings = {}
    for name in FINDINGS:
        if rng.random() >= FINDING_PROB:
            continue
        f = {"side": str(rng.choice(["right", "left"]))}
        if name in SIZES:
            f["size"] = str(rng.choice(SIZES[name]))
        if name in ("consolidation", "nodule"):
            f["zone"] = str(rng.choice(["upper", "middle", "lower"]))
        if name == "atelectasis":
            f["zone"] = str(rng.choice(["middle", "lower"]))
        if name == "nodule":
            f["mm"] = int(rng.integers(5, 15)) * 2  # 10..28 mm
        if name == "cardiomegaly":
            del f["side"]
            anatomy["ctr"] = rng.uniform(0.55, 0.60) if f["size"] == "mild" else rng.uniform(0.61, 0.67)
        f["where"] = rng.uniform(-1, 1, size=3).tolist()  # position jitter inside its zone
        findings[name] = f
    return {"anatomy": anatomy, "findings": findings}


def _lung(X, Y, cx, hw, top, base, dome=0.05):
    """Boolean lung field: rounded apex at `top`, diaphragm dome over `base` (its lowest, lateral point)."""
    t = np.clip((Y - top) / 0.22, 0, 1)
    rel = (X - cx) / hw
    bottom = base - dome * np.clip(1 - rel**2, 0, 1)
    return (np.abs(rel) < np.sqrt(t) * (1 + 0.08 * t)) & (Y > top) & (Y < bottom)


def _ellipse(X, Y, cx, cy, rx, ry, angle=0.0):
    c, s = math.cos(angle), math.sin(angle)
    u, v = (X - cx) * c + (Y - cy) * s, -(X - cx) * s + (Y - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 < 1


def _smooth_noise(rng, size, cells):
    """Blobby noise in about [-1, 1]: a cells x cells random grid, upsampled bicubic."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((size, size), Image.BICUBIC))


def render_case(case: dict, size: int, noise_rng) -> tuple[np.ndarray, np.ndarray]:
    """Draw a case: returns the image (size, size) uint8 and the finding masks (K, size, size) bool."""
    a, S = case["anatomy"], size
    X, Y = np.meshgrid((np.arange(S) + 0.5) / S, (np.arange(S) + 0.5) / S)  # image coordinates in [0, 1]
    cx, s, top = a["cx"], a["s"], a["top"]
    hw = 0.135 * s
    sides = {"right": (cx - 0.165 * s, a["base"], -1), "left": (cx + 0.165 * s, a["base"] + 0.02, 1)}
    lungs = {k: _lung(X, Y, x, hw, top, b) for k, (x, b, _) in sides.items()}
    lung = lungs["right"] | lungs["left"]
    masks = np.zeros((len(FINDINGS), S, S), dtype=bool)
    texture = np.ones((S, S), np.float32)   # lung markings, removed where a pneumothorax is
    extra = np.zeros((S, S), np.float32)    # densities added by findings

    def zone_y(side, zone):
        height = sides[side][1] - top
        return top + height * {"upper": 0.2, "middle": 0.5, "lower": 0.78}[zone]

    for name, f in case["findings"].items():
        k, (j0, j1, j2) = FINDINGS.index(name), f["where"]
        if name == "cardiomegaly":
            continue  # drawn with the heart below
        lx, base, lateral = sides[f["side"]]
        inside = lungs[f["side"]]
        if name == "pleural effusion":  # fluid fills the base, meniscus climbing laterally
            h = {"small": 0.14, "moderate": 0.24, "large": 0.36}[f["size"]]
            out = np.clip((X - lx) * lateral / hw, 0, 1)
            m = inside & (Y > base - h - 0.04 * out)
            texture[m] = 0.0  # fluid hides the lung markings behind it
            extra += 0.3 * m
        elif name == "pneumothorax":  # lung edge pulled in from the chest wall; no markings outside it
            c = {"small": 0.3, "large": 0.6}[f["size"]]
            shifted = lx - lateral * c * hw * 0.6
            collapsed = _lung(X, Y, shifted, hw * (1 - c), top + 0.1 * c, base)
            edge = collapsed & ~_lung(X, Y, shifted, hw * (1 - c) - 0.006, top + 0.1 * c + 0.006, base)
            m = inside & ~collapsed
            texture[m] = 0.0
            extra += -0.1 * m + 0.15 * (edge & inside)
        elif name == "consolidation":  # a cloud of overlapping blobs
            r = {"small": 0.06, "large": 0.11}[f["size"]] * s
            y0, x0 = zone_y(f["side"], f["zone"]) + 0.03 * j1, lx + 0.35 * hw * j0
            blob = np.zeros_like(X)
            for t in range(5):
                bx, by = x0 + 0.5 * r * math.cos(2.4 * t + j2), y0 + 0.5 * r * math.sin(2.4 * t + j2)
                blob = np.maximum(blob, np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / (2 * (0.6 * r) ** 2)))
            m = inside & (blob > 0.5)
            extra += 0.3 * blob * inside
        elif name == "nodule":
            r = f["mm"] / 2 / MM_PER_IMAGE_WIDTH
            y0, x0 = zone_y(f["side"], f["zone"]) + 0.02 * j1, lx + 0.4 * hw * j0
            m = _ellipse(X, Y, x0, y0, r, r) & inside
            extra += 0.45 * m
        elif name == "atelectasis":  # a plate-like band, nearly horizontal
            length = {"mild": 0.3, "moderate": 0.6}[f["size"]] * hw
            y0, x0 = zone_y(f["side"], f["zone"]) + 0.02 * j1, lx + 0.2 * hw * j0
            m = _ellipse(X, Y, x0, y0, length, 0.022 * s, angle=0.25 * j2) & inside
            extra += 0.3 * m
        masks[k] = m

    # heart: its width over the chest's is the cardiothoracic ratio (> 0.5 is cardiomegaly)
    heart_rx = a["ctr"] * 0.6 * s / 2
    heart = _ellipse(X, Y, cx + 0.3 * heart_rx, a["base"] - 0.1, heart_rx, 0.12 * s)
    if "cardiomegaly" in case["findings"]:
        masks[FINDINGS.index("cardiomegaly")] = heart

    img = np.full((S, S), 0.04, np.float32)                                        # air
    img += a["tissue"] * _ellipse(X, Y, cx, 0.6, 0.44 * s, 0.62)                     # body
    img -= 0.25 * lung                                                              # lung fields
    img += 0.05 * lung * texture * _smooth_noise(noise_rng, S, 24)                  # vessels
    img += 0.25 * (np.abs(X - cx) < 0.05 * s) * (Y < a["base"] - 0.05)             # mediastinum
    spine = np.abs(X - cx) < 0.032 * s
    img += spine * (0.12 + 0.04 * np.cos(2 * math.pi * Y / 0.045))                  # vertebrae
    img += 0.25 * heart
    # posterior ribs: ten arcs a side, curving down away from the spine
    out = np.abs(X - cx)
    phase = (Y - top + 0.02 - 1.2 * np.clip(out - 0.04, 0, None) ** 2) / (0.062 * s)
    rib = np.abs(phase - np.round(phase)) * 0.062 < 0.011
    img += 0.07 * (rib & (phase > -0.5) & (phase < 9.5) & (out > 0.03) & (out < 0.165 * s + hw * 1.15))
    img += extra
    img += 0.03 * _smooth_noise(noise_rng, S, 6)                                   # uneven exposure
    img = np.clip(img, 0, 1) ** a["gamma"]
    img += noise_rng.normal(0, 0.012, (S, S)).astype(np.float32)                   # quantum noise
    gray = Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
    gray = gray.filter(ImageFilter.GaussianBlur(S / 512))                           # soft edges
    return np.asarray(gray), masks


# Per finding: sentences if present, its impression, sentences if absent, P(an absence is said); fields from the case
REPORT_TEMPLATES = {
    "cardiomegaly": (["The heart is {size}ly enlarged.", "{Size} cardiomegaly.",
                      "The cardiac silhouette is {size}ly enlarged."], "{Size} cardiomegaly.",
                     ["Heart size is normal.", "The cardiac silhouette is within normal limits.", "Normal heart size."],
                     1.0),
    "pleural effusion": (["{Size} {side} pleural effusion.", "There is a {size} {side} pleural effusion.",
                          "A {size} {side}-sided pleural effusion is present."], "{Size} {side} pleural effusion.",
                         ["No pleural effusion.", "There is no pleural effusion.", "No effusion."], 0.7),
    "pneumothorax": (["{Size} {side} pneumothorax.", "There is a {size} {side} pneumothorax.",
                      "A {size} {side} apical pneumothorax is seen."], "{Size} {side} pneumothorax.",
                     ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."], 0.7),
    "consolidation": (["{Size} area of consolidation in the {where}.", "There is a {size} focal consolidation in the "
                       "{where}.", "A {size} opacity in the {where} is consistent with consolidation."],
                      "{Size} {where} consolidation.", ["No focal consolidation.", "There is no focal consolidation."],
                      0.5),
    "nodule": (["A {mm} mm nodule is seen in the {where}.", "There is a {mm} mm {where} nodule.",
                "{mm} mm nodular opacity in the {where}."], "{mm} mm {where} nodule, recommend follow-up CT.", [], 0.0),
    "atelectasis": (["{Size} linear atelectasis at the {where}.",
                     "There is {size} plate-like atelectasis at the {where}."], "{Size} atelectasis at the {where}.",
                    [], 0.0),
}


# The finding alone, its side, size and zone left to the film: half of the impression's lines (phrasing stream).
PLAIN_IMPRESSIONS = {"cardiomegaly": "Cardiomegaly.", "pleural effusion": "Pleural effusion.",
                     "pneumothorax": "Pneumothorax.", "consolidation": "Consolidation, possibly pneumonia.",
                     "nodule": "Pulmonary nodule, recommend follow-up CT.", "atelectasis": "Atelectasis."}
PLAIN_IMPRESSION_PROB = 0.5


def write_report(case: dict, rng) -> str:
    """A FINDINGS / IMPRESSION report for a case; `rng` picks phrasing, order and absences, never from attributes."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    sentences, impression = [], []
    for name, (present, summary, absent, p_absent) in REPORT_TEMPLATES.items():
        f = case["findings"].get(name)
        if f is None:
            if absent and rng.random() < p_absent:
                sentences.append(pick(absent))
            continue
        size = f.get("size", "")
        if name == "atelectasis":
            where = f"{f['side']} " + {"lower": "base", "middle": "mid lung"}[f["zone"]]
        elif "zone" in f:
            where = f"{f['side']} " + {"upper": "upper", "middle": "mid", "lower": "lower"}[f["zone"]] + " zone"
        else:
            where = ""
        fill = dict(size=size, Size=size.capitalize(), side=f.get("side", ""), where=where, mm=f.get("mm", ""))
        sentences.append(pick(present).format(**fill))
        plain = rng.random() < PLAIN_IMPRESSION_PROB
        impression.append(PLAIN_IMPRESSIONS[name] if plain else summary.format(**fill))
    if rng.random() < 0.5:
        sentences.append(pick(["The mediastinal contours are unremarkable.", "Mediastinal contours are normal."]))
    if rng.random() < 0.3:
        sentences.append("No acute osseous abnormality.")
    findings = " ".join(sentences[j] for j in rng.permutation(len(sentences)))
    if impression:
        impression_text = " ".join(impression[j] for j in rng.permutation(len(impression)))
    else:
        impression_text = pick(["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                                "Normal chest radiograph."])
    return f"FINDINGS: {findings} IMPRESSION: {impression_text}"


def synth_labels(case: dict) -> np.ndarray:
    """Multi-hot labels in FINDINGS order, float32 (K,)."""
    return np.array([name in case["findings"] for name in FINDINGS], dtype=np.float32)


def synth_report(i: int, seed: int = 0) -> str:
    return write_report(synth_case(i, seed), np.random.default_rng([seed, i, 1]))


def synth_record(i: int, size: int = 256, seed: int = 0) -> dict:
    """Synthetic record i: image (size, size) uint8, report str, labels (K,), masks (K, size, size) bool."""
    case = synth_case(i, seed)
    image, masks = render_case(case, size, np.random.default_rng([seed, i, 2]))
    return {"image": image, "report": synth_report(i, seed), "labels": synth_labels(case), "masks": masks}


class SyntheticFilms:
    """Records first..first+n-1 as an image source, rendered once into memory that DataLoader workers share, with
    labels (n, K) and, given `findings`, their union as a mask; over cache_mb rendered film by film as read."""

    def __init__(self, first: int, n: int, size: int, findings=(), seed: int = 0, cache_mb: float = math.inf):
        self.first, self.n, self.size, self.seed = first, n, size, seed
        self.images = self.labels = self.masks = None
        if n * size * size > cache_mb * 2**20:
            return
        keep = [FINDINGS.index(f) for f in findings]
        images, labels, masks = [], [], []
        for i in progress(range(first, first + n), desc="rendering synthetic records", unit=" records"):
            rec = synth_record(i, size, seed)
            images.append(rec["image"])
            labels.append(rec["labels"])
            if keep:
                masks.append(rec["masks"][keep].any(0))
        self.images, self.labels = np.stack(images), np.stack(labels)
        self.masks = np.stack(masks) if keep else None

    def __len__(self):
        return self.n

    def load(self, i: int) -> Image.Image:
        if self.images is None:
            return Image.fromarray(synth_record(self.first + i, self.size, self.seed)["image"])
        return Image.fromarray(self.images[i])

    def load_mask(self, i: int) -> Image.Image:
        return Image.fromarray(self.masks[i].astype(np.uint8) * 255)

    def where(self, i: int) -> str:
        return f"synthetic record {self.first + i}"

"""Scenes of the synthetic benchmark: the attribute vocabulary, sampling a scene spec, simulating it, drawing it.

A *spec* is a plain JSON-able dict that fully determines a clip (pixels and text):

    {"size": 64, "fps": 8, "num_frames": T, "text_seed": int,
     "background": {"style": "striped", "colour": "gray"},
     "objects": [{"shape": "circle", "colour": "red", "size": "small", "x": 0.3, "y": 0.6}, ...],
     "events": [{"object": 0, "type": "move", "value": "left", "amount": 0.25, "start": 3, "end": 12}, ...]}

Positions and amounts are fractions of the frame side (resolution independent); event start/end are frame indices,
end exclusive. Events are sequential and never overlap. `simulate` turns a spec into per-frame tracks, `render` draws
them with numpy (anti-aliased edges from a signed distance), `spec_valid` checks every visible object stays inside
the frame. The composed-retrieval edits in `synth` change one attribute of a spec and re-render it.
"""
from __future__ import annotations

import math

import numpy as np

# ------------------------------------------------------------------------------------------------------- vocabulary
SHAPES = ["circle", "square", "triangle", "star", "diamond", "hexagon"]
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 110, 255),
    "yellow": (250, 230, 40),
    "purple": (170, 70, 230),
    "orange": (255, 140, 20),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
}
SIZES = {"small": 0.09, "medium": 0.125, "large": 0.165}  # radius as a fraction of the frame side
BG_STYLES = ["plain", "striped", "checkered", "gradient", "dotted"]
# Dark, low-saturation backgrounds so every object colour stands out; (base, lighter) pattern pair.
BG_COLOURS = {
    "black": ((18, 18, 18), (52, 52, 52)),
    "gray": ((92, 92, 92), (125, 125, 125)),
    "navy": ((18, 26, 82), (42, 56, 128)),
    "brown": ((86, 52, 22), (122, 80, 40)),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
ROTATIONS = {"clockwise": 90.0, "counterclockwise": -90.0}  # degrees; y points down, so +angle turns clockwise
EVENT_TYPES = ["move", "grow", "shrink", "rotate", "change", "appear", "disappear"]
EVENT_WEIGHTS = {"move": 3.0, "grow": 1.0, "shrink": 1.0, "rotate": 1.0, "change": 1.5, "appear": 0.75,
                 "disappear": 0.75}
GROW, SHRINK = 1.5, 0.6
MOVE_MIN, MOVE_MAX = 0.15, 0.32
MARGIN = 0.02
MIN_RADIUS = 0.045  # shrinking stops where an object would drop under ~3 px at 64 px

# Shape × colour pairs that never occur in train/val/test (not even after a colour change) and that every clip of
# the compositional split contains. Colour j is held out with shape (j + 2) mod 6: each colour loses exactly one
# shape and each shape loses one or two colours, so every shape and every colour is still seen in training.
HELD_OUT_PAIRS = [(SHAPES[(j + 2) % len(SHAPES)], c) for j, c in enumerate(COLOURS)]


def pair_held_out(shape: str, colour: str) -> bool:
    return (shape, colour) in _HELD_OUT_SET


_HELD_OUT_SET = set(HELD_OUT_PAIRS)


# ----------------------------------------------------------------------------------------------------- shape masks
def _regular(n: int, radius: float = 1.0, phase: float = -90.0) -> np.ndarray:
    a = np.deg2rad(phase + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(a), np.sin(a)], 1)


def _halfplanes(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outward unit normals N (K, 2) and offsets C (K,) of a convex polygon: inside ⇔ max_k(N_k·p − C_k) < 0."""
    centre = vertices.mean(0)
    edges = np.roll(vertices, -1, 0) - vertices
    normals = np.stack([edges[:, 1], -edges[:, 0]], 1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    flip = ((vertices - centre) * normals).sum(1) < 0
    normals[flip] *= -1
    return normals, (normals * vertices).sum(1)


def _star_pieces() -> list[tuple[np.ndarray, np.ndarray]]:
    # A five-point star is not convex: draw it as the central pentagon plus five tip triangles whose bases reach
    # into the pentagon. Pieces must overlap, not just touch — coverage is the max over pieces, and two pieces
    # that only share an edge would each give 0.5 there and leave a dark seam.
    outer = _regular(5, 1.0)
    inner = _regular(5, 0.45, -90.0 + 36.0)
    pieces = [_halfplanes(inner)]
    for i in range(5):
        a, b = inner[(i - 1) % 5], inner[i]
        # Extending the two tip edges past the inner vertices stays inside the star (the corners there are reflex).
        pieces.append(_halfplanes(np.stack([outer[i], a + 0.4 * (a - outer[i]), b + 0.4 * (b - outer[i])])))
    return pieces


# Unit-size shapes (circumradius 1, circle radius 0.85 so areas look alike); each a list of convex pieces.
SHAPE_PIECES = {
    "square": [_halfplanes(_regular(4, 1.0, -45.0))],
    "triangle": [_halfplanes(_regular(3, 1.0) + np.array([0.0, 0.15]))],
    "diamond": [_halfplanes(np.array([[0.0, -1.0], [0.68, 0.0], [0.0, 1.0], [-0.68, 0.0]]))],
    "hexagon": [_halfplanes(_regular(6, 1.0))],
    "star": _star_pieces(),
}
CIRCLE_RADIUS = 0.85


# ------------------------------------------------------------------------------------------------------ simulation
def _progress(num_frames: int, start: int, end: int) -> np.ndarray:
    """0 before the event, rising linearly to exactly 1 on its last frame, 1 after (smoothstep eased)."""
    t = np.arange(num_frames, dtype=np.float64)
    p = np.clip((t - start + 1) / max(end - start, 1), 0.0, 1.0)
    return p * p * (3 - 2 * p)


def simulate(spec: dict) -> list[dict]:
    """Per-object tracks over all frames: x, y (fractions), radius (fraction), angle (degrees), alpha, rgb (T, 3)."""
    t_count = spec["num_frames"]
    tracks = []
    for i, obj in enumerate(spec["objects"]):
        x = np.full(t_count, obj["x"])
        y = np.full(t_count, obj["y"])
        scale = np.ones(t_count)
        angle = np.zeros(t_count)
        alpha = np.ones(t_count)
        rgb = np.tile(np.array(COLOURS[obj["colour"]], np.float64), (t_count, 1))
        for ev in spec["events"]:
            if ev["object"] != i:
                continue
            p = _progress(t_count, ev["start"], ev["end"])
            kind = ev["type"]
            if kind == "move":
                dx, dy = DIRECTIONS[ev["value"]]
                x = x + dx * ev["amount"] * p
                y = y + dy * ev["amount"] * p
            elif kind in ("grow", "shrink"):
                scale = scale * (1 + (ev["amount"] - 1) * p)
            elif kind == "rotate":
                angle = angle + ROTATIONS[ev["value"]] * p
            elif kind == "change":
                rgb = rgb + (np.array(COLOURS[ev["value"]], np.float64) - rgb) * p[:, None]
            elif kind == "appear":
                alpha = alpha * p
            elif kind == "disappear":
                alpha = alpha * (1 - p)
            else:
                raise ValueError(f"unknown event type {kind!r}")
        radius = SIZES[obj["size"]] * scale
        tracks.append({"x": x, "y": y, "radius": radius, "angle": angle, "alpha": alpha, "rgb": rgb})
    return tracks


def spec_valid(spec: dict) -> bool:
    """Every object inside the frame (with a margin) whenever it is visible."""
    for tr in simulate(spec):
        vis = tr["alpha"] > 0
        r = tr["radius"][vis]
        for c in (tr["x"][vis], tr["y"][vis]):
            if np.any(c - r < MARGIN - 1e-9) or np.any(c + r > 1 - MARGIN + 1e-9):
                return False
    return True


# ---------------------------------------------------------------------------------------------------------- drawing
def background_image(style: str, colour: str, size: int) -> np.ndarray:
    base, light = (np.array(c, np.float32) for c in BG_COLOURS[colour])
    u = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(u, u, indexing="ij")
    if style == "plain":
        w = np.zeros_like(xx)
    elif style == "striped":
        w = (np.floor((xx + yy) * 8) % 2).astype(np.float32)  # diagonal stripes, 8 per side
    elif style == "checkered":
        w = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2).astype(np.float32)
    elif style == "gradient":
        w = 1.6 * yy - 0.3  # dark at the top, lighter than the pattern colour at the bottom
    elif style == "dotted":
        d = np.hypot((xx * 8) % 1 - 0.5, (yy * 8) % 1 - 0.5) * (size / 8)
        w = np.clip(0.5 - (d - size / 48), 0, 1)
    else:
        raise ValueError(f"unknown background style {style!r}")
    return base + (light - base) * w[..., None]


def _coverage(shape: str, u: np.ndarray, v: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a (pixel-scaled) signed distance; u, v in unit shape coordinates."""
    if shape == "circle":
        dist = (np.sqrt(u * u + v * v) - CIRCLE_RADIUS) * radius_px
        return np.clip(0.5 - dist, 0.0, 1.0)
    cov = None
    for normals, offsets in SHAPE_PIECES[shape]:
        dist = None
        for (nx, ny), c in zip(normals, offsets):
            d = nx * u + ny * v - c
            dist = d if dist is None else np.maximum(dist, d)
        piece = np.clip(0.5 - dist * radius_px, 0.0, 1.0)
        cov = piece if cov is None else np.maximum(cov, piece)
    return cov


def render(spec: dict) -> np.ndarray:
    """The clip as uint8 (T, S, S, 3). Objects are drawn in index order over the static background."""
    size, t_count = spec["size"], spec["num_frames"]
    bg = background_image(spec["background"]["style"], spec["background"]["colour"], size)
    frames = np.repeat(bg[None], t_count, 0)
    for obj, tr in zip(spec["objects"], simulate(spec)):
        live = np.nonzero(tr["alpha"] > 0)[0]
        if live.size == 0:
            continue
        # Work on the bounding box of the whole trajectory only: objects are small next to the frame.
        xs, ys, rs = tr["x"][live] * size, tr["y"][live] * size, tr["radius"][live] * size
        x0, x1 = int(max(0, math.floor((xs - rs).min()) - 1)), int(min(size, math.ceil((xs + rs).max()) + 1))
        y0, y1 = int(max(0, math.floor((ys - rs).min()) - 1)), int(min(size, math.ceil((ys + rs).max()) + 1))
        px = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, None, :]
        py = (np.arange(y0, y1, dtype=np.float32) + 0.5)[None, :, None]
        cx, cy, r = (a.astype(np.float32)[:, None, None] for a in (xs, ys, rs))
        theta = np.deg2rad(tr["angle"][live]).astype(np.float32)[:, None, None]
        dx, dy = (px - cx) / r, (py - cy) / r
        cos, sin = np.cos(theta), np.sin(theta)
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotate the sample points by −angle
        a = _coverage(obj["shape"], u, v, r) * tr["alpha"][live].astype(np.float32)[:, None, None]
        a = a[..., None]
        rgb = tr["rgb"][live].astype(np.float32)[:, None, None, :]
        region = frames[live, y0:y1, x0:x1]
        frames[live, y0:y1, x0:x1] = region + (rgb - region) * a
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------- sampling
def _allocate_frames(rng: np.random.Generator, n_events: int, fps: int, min_s: float, max_s: float):
    """Clip length and sequential, non-overlapping event windows [start, end) in frames."""
    ev_min = max(2, round(0.75 * fps))
    gap_min = 1
    need = n_events * ev_min + (n_events - 1) * gap_min + 2
    lo = max(round(min_s * fps), need)
    hi = max(round(max_s * fps), lo)
    t_count = int(rng.integers(lo, hi + 1))
    free = t_count - (n_events * ev_min + (n_events - 1) * gap_min)
    bins = rng.multinomial(free, np.full(2 * n_events + 1, 1.0 / (2 * n_events + 1)))
    windows, t = [], int(bins[0])
    for k in range(n_events):
        length = ev_min + int(bins[1 + 2 * k])
        windows.append((t, t + length))
        t += length + (gap_min + int(bins[2 + 2 * k]) if k < n_events - 1 else 0)
    return t_count, windows


def _sample_objects(rng, n_obj: int, pair_ok, forced_pair=None) -> list[dict]:
    shapes = list(rng.permutation(SHAPES))
    colours = list(rng.permutation(list(COLOURS)))
    objects = []
    forced_at = int(rng.integers(n_obj)) if forced_pair else -1
    for i in range(n_obj):
        if i == forced_at:
            shape, colour = forced_pair
        else:
            used_s = {o["shape"] for o in objects} | ({forced_pair[0]} if forced_pair else set())
            used_c = {o["colour"] for o in objects} | ({forced_pair[1]} if forced_pair else set())
            options = [(s, c) for s in shapes for c in colours
                       if s not in used_s and c not in used_c and pair_ok(s, c)]
            shape, colour = options[int(rng.integers(len(options)))]
        objects.append({"shape": str(shape), "colour": str(colour), "size": str(rng.choice(list(SIZES)))})
    # Positions: rejection-sample non-overlapping centres; after 50 tries overlap is allowed (rare, harmless).
    for i, obj in enumerate(objects):
        r = SIZES[obj["size"]] * 1.1
        for _ in range(50):
            x, y = rng.uniform(MARGIN + r, 1 - MARGIN - r, size=2)
            if all(math.hypot(x - o["x"], y - o["y"]) > r + SIZES[o["size"]] * 1.1 + 0.03 for o in objects[:i]):
                break
        obj["x"], obj["y"] = round(float(x), 4), round(float(y), 4)
    return objects


def _candidates(state: list[dict], obj_i: int, is_last: bool, pair_ok, used_colours: set) -> list[tuple]:
    """Feasible (type, value, amount) for object obj_i given its state before the event."""
    st = state[obj_i]
    if not st["alive"]:
        return []
    out = []
    r = st["radius"]
    if not st["has_events"]:
        out.append(("appear", "", 0.0))
    for name, (dx, dy) in DIRECTIONS.items():
        pos = st["x"] if dx else st["y"]
        sign = dx or dy
        room = (1 - MARGIN - r - pos) if sign > 0 else (pos - MARGIN - r)
        if room >= MOVE_MIN:
            out.append(("move", name, min(room, MOVE_MAX)))
    big = r * GROW
    if min(st["x"], st["y"], 1 - st["x"], 1 - st["y"]) - MARGIN >= big:
        out.append(("grow", "", GROW))
    if r * SHRINK >= MIN_RADIUS:
        out.append(("shrink", "", SHRINK))
    if st["shape"] != "circle":
        out.extend(("rotate", name, 0.0) for name in ROTATIONS)
    out.extend(("change", c, 0.0) for c in COLOURS if c not in used_colours and pair_ok(st["shape"], c))
    others_alive = any(s["alive"] for j, s in enumerate(state) if j != obj_i)
    if is_last or others_alive:
        out.append(("disappear", "", 0.0))
    return out


def sample_spec(rng: np.random.Generator, *, size: int = 64, fps: int = 8, max_events: int = 4,
                pair_ok=lambda s, c: True, forced_pair=None, min_seconds: float = 3.0,
                max_seconds: float = 8.0) -> dict:
    """A random scene: 1–3 objects with distinct shapes and colours, 1..max_events sequential events."""
    n_obj = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    n_events = int(rng.integers(1, max_events + 1))
    objects = _sample_objects(rng, n_obj, pair_ok, forced_pair)
    t_count, windows = _allocate_frames(rng, n_events, fps, min_seconds, max_seconds)
    state = [{"shape": o["shape"], "x": o["x"], "y": o["y"], "radius": SIZES[o["size"]], "alive": True,
              "has_events": False} for o in objects]
    used_colours = {o["colour"] for o in objects}
    seen = set()  # (object, type, value) once per clip, so each event's text is unique within the clip
    events = []
    for k, (start, end) in enumerate(windows):
        options = []
        for i in range(n_obj):
            for kind, value, amount in _candidates(state, i, k == n_events - 1, pair_ok, used_colours):
                if (i, kind, value) not in seen:
                    options.append((i, kind, value, amount))
        weights = np.array([EVENT_WEIGHTS[o[1]] for o in options])
        i, kind, value, amount = options[int(rng.choice(len(options), p=weights / weights.sum()))]
        if kind == "move":
            # Rounded down so the stored spec (4 decimals) never moves further than the room that was checked.
            amount = math.floor(float(rng.uniform(MOVE_MIN, amount)) * 1e4) / 1e4
        seen.add((i, kind, value))
        st = state[i]
        st["has_events"] = True
        if kind == "move":
            dx, dy = DIRECTIONS[value]
            st["x"] += dx * amount
            st["y"] += dy * amount
        elif kind in ("grow", "shrink"):
            st["radius"] *= amount
        elif kind == "change":
            used_colours.add(value)
        elif kind == "disappear":
            st["alive"] = False
        events.append({"object": i, "type": kind, "value": value, "amount": float(amount),
                       "start": start, "end": end})
    spec = {"size": size, "fps": fps, "num_frames": t_count, "text_seed": int(rng.integers(2**31)),
            "background": {"style": str(rng.choice(BG_STYLES)), "colour": str(rng.choice(list(BG_COLOURS)))},
            "objects": objects, "events": events}
    return spec

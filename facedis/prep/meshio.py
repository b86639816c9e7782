"""Fast, robust readers for the mesh formats of the real data sets.

- PLY: ``binary_little_endian``, ``binary_big_endian`` and ``ascii``; any vertex properties
  (x, y, z are picked by name), face lists of any polygon size (fan-triangulated). Binary files are
  decoded with ``np.frombuffer`` on a structured dtype, so a CoMA frame takes well under a millisecond.
- OBJ: ``v`` and ``f`` records anywhere in the file, ``f`` tokens ``i``, ``i/t``, ``i//n``, ``i/t/n``,
  negative (relative) indices, polygons fan-triangulated, comments and other records ignored.
- VRML 2.0 / 97 ``IndexedFaceSet``: a real tokenizer over the node structure (comments, commas and
  arbitrary line breaks are tolerated; ``TextureCoordinate`` points and ``texCoordIndex`` are not
  confused with the geometry), ``coordIndex`` polygons separated by ``-1`` are fan-triangulated.
  Several ``IndexedFaceSet`` nodes in one file are concatenated.
- Anything else: ``trimesh.load(process=False)``.

Every reader raises :class:`MeshReadError` whose message starts with the file name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

__all__ = ["MeshReadError", "read_mesh", "read_ply", "read_obj", "read_wrl", "write_ply", "write_obj",
           "triangulate_polygons"]


class MeshReadError(ValueError):
    """A mesh file cannot be read (the message names the file)."""


# ---------------------------------------------------------------------------- helpers


def triangulate_polygons(polys: list[np.ndarray] | list[list[int]]) -> np.ndarray:
    """Fan-triangulate polygons (lists of vertex indices) into an (F,3) int64 array."""
    out = []
    for p in polys:
        p = np.asarray(p, dtype=np.int64)
        if len(p) < 3:
            continue
        if len(p) == 3:
            out.append(p[None])
        else:
            k = len(p) - 2
            tri = np.empty((k, 3), dtype=np.int64)
            tri[:, 0] = p[0]
            tri[:, 1] = p[1:-1]
            tri[:, 2] = p[2:]
            out.append(tri)
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)


def _split_by_counts(flat: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Faces from a flat ``[n, i0..in-1, n, ...]`` stream already split into (counts, indices)."""
    if len(counts) and (counts == 3).all():
        return flat.reshape(-1, 3)
    ends = np.cumsum(counts)
    starts = ends - counts
    return triangulate_polygons([flat[s:e] for s, e in zip(starts, ends)])


def _check_faces(path, faces: np.ndarray, nv: int) -> np.ndarray:
    faces = np.asarray(faces)
    if faces.size and (faces.min() < 0 or faces.max() >= nv):
        raise MeshReadError(f"{path}: face indices outside [0, {nv}) (min {faces.min()}, max {faces.max()})")
    return faces.astype(np.int32).reshape(-1, 3)


# ---------------------------------------------------------------------------- PLY

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def _parse_ply_header(path, data: bytes):
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise MeshReadError(f"{path}: not a PLY file (missing 'ply' magic or 'end_header')")
    nl = data.find(b"\n", end)
    if nl < 0:
        raise MeshReadError(f"{path}: truncated PLY header")
    body = nl + 1
    fmt = None
    elements: list[dict] = []
    for raw in data[:end].decode("ascii", "replace").splitlines()[1:]:
        tok = raw.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append({"name": tok[1], "count": int(tok[2]), "props": []})
        elif tok[0] == "property":
            if not elements:
                raise MeshReadError(f"{path}: PLY property before any element")
            if tok[1] == "list":
                elements[-1]["props"].append((tok[4], "list", _PLY_TYPES[tok[2]], _PLY_TYPES[tok[3]]))
            else:
                if tok[1] not in _PLY_TYPES:
                    raise MeshReadError(f"{path}: unknown PLY property type {tok[1]!r}")
                elements[-1]["props"].append((tok[2], _PLY_TYPES[tok[1]]))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise MeshReadError(f"{path}: unsupported PLY format {fmt!r}")
    return fmt, elements, body


def _ply_xyz(path, data: bytes, pos: int, count: int, props, end: str, dt: np.dtype) -> np.ndarray:
    names = [p[0] for p in props]
    try:
        ix = [names.index("x"), names.index("y"), names.index("z")]
    except ValueError:
        raise MeshReadError(f"{path}: PLY vertex element lacks x/y/z properties") from None
    types = {p[1] for p in props}
    if len(types) == 1:  # all properties share one type: a strided view, no structured access
        arr = np.frombuffer(data, dtype=end + props[0][1], count=count * len(props), offset=pos)
        arr = arr.reshape(count, len(props))
        if ix == [0, 1, 2] and len(props) == 3:
            return arr.astype(np.float32)  # copy (the buffer is read-only bytes)
        return arr[:, ix].astype(np.float32)
    arr = np.frombuffer(data, dtype=dt, count=count, offset=pos)
    out = np.empty((count, 3), dtype=np.float32)
    for k, n in enumerate(("x", "y", "z")):
        out[:, k] = arr[n]
    return out


def _read_ply_vertices_only(path):
    """Binary PLY whose vertex element comes first: read just the header and the vertex block."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
        if b"end_header" not in head:
            return None
        fmt, elements, pos = _parse_ply_header(path, head)
        if fmt == "ascii" or not elements or elements[0]["name"] != "vertex" \
                or any(p[1] == "list" for p in elements[0]["props"]):
            return None
        end = "<" if fmt == "binary_little_endian" else ">"
        props, count = elements[0]["props"], elements[0]["count"]
        dt = np.dtype([(p[0], end + p[1]) for p in props])
        nbytes = dt.itemsize * count
        body = head[pos:]
        if len(body) < nbytes:
            body += fh.read(nbytes - len(body))
        if len(body) < nbytes:
            raise MeshReadError(f"{path}: truncated PLY (element 'vertex' needs {nbytes} bytes, {len(body)} left)")
        return _ply_xyz(path, body, 0, count, props, end, dt), None


def read_ply(path, faces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a PLY file. Returns ``(vertices (V,3) float32, triangles (F,3) int32 or None)``."""
    try:
        if not faces:
            r = _read_ply_vertices_only(path)
            if r is not None:
                return r
        data = Path(path).read_bytes()
    except OSError as e:
        raise MeshReadError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise MeshReadError(f"{path}: malformed PLY ({e})") from None
    try:
        return _read_ply_bytes(path, data, faces)
    except MeshReadError:
        raise
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise MeshReadError(f"{path}: malformed PLY ({e})") from None


def _read_ply_bytes(path, data: bytes, want_faces: bool):
    fmt, elements, pos = _parse_ply_header(path, data)
    if fmt == "ascii":
        return _read_ply_ascii(path, data[pos:], elements, want_faces)
    end = "<" if fmt == "binary_little_endian" else ">"
    verts = tris = None
    for el in elements:
        name, count, props = el["name"], el["count"], el["props"]
        has_list = any(p[1] == "list" for p in props)
        if not has_list:
            dt = np.dtype([(p[0], end + p[1]) for p in props])
            nbytes = dt.itemsize * count
            if pos + nbytes > len(data):
                raise MeshReadError(f"{path}: truncated PLY (element {name!r} needs {nbytes} bytes, "
                                    f"{len(data) - pos} left)")
            if name == "vertex":
                verts = _ply_xyz(path, data, pos, count, props, end, dt)
            pos += nbytes
            continue
        # element with a list property (faces): try the fixed-size fast path first
        if name == "face" and not want_faces and verts is not None:
            break
        if len(props) == 1 and props[0][1] == "list":
            cnt_t, idx_t = props[0][2], props[0][3]
            cnt_dt, idx_dt = np.dtype(end + cnt_t), np.dtype(end + idx_t)
            if count and pos + cnt_dt.itemsize <= len(data):
                n0 = int(np.frombuffer(data, dtype=cnt_dt, count=1, offset=pos)[0])
                dt = np.dtype([("n", cnt_dt), ("i", idx_dt, (n0,))])
                if pos + dt.itemsize * count <= len(data):
                    arr = np.frombuffer(data, dtype=dt, count=count, offset=pos)
                    if (arr["n"] == n0).all():
                        if name == "face":
                            tris = _split_by_counts(arr["i"].astype(np.int64).ravel(),
                                                    np.full(count, n0)) if n0 != 3 else np.ascontiguousarray(arr["i"])
                        pos += dt.itemsize * count
                        continue
        # general path: walk the records
        polys = []
        for _ in range(count):
            poly = None
            for p in props:
                if p[1] == "list":
                    cdt, idt = np.dtype(end + p[2]), np.dtype(end + p[3])
                    if pos + cdt.itemsize > len(data):
                        raise MeshReadError(f"{path}: truncated PLY in element {name!r}")
                    n = int(np.frombuffer(data, dtype=cdt, count=1, offset=pos)[0])
                    pos += cdt.itemsize
                    if pos + idt.itemsize * n > len(data):
                        raise MeshReadError(f"{path}: truncated PLY in element {name!r}")
                    vals = np.frombuffer(data, dtype=idt, count=n, offset=pos)
                    pos += idt.itemsize * n
                    if p[0] in ("vertex_indices", "vertex_index"):
                        poly = vals
                else:
                    pos += np.dtype(p[1]).itemsize
            if name == "face" and poly is not None:
                polys.append(poly)
        if name == "face":
            tris = triangulate_polygons(polys)
    if verts is None:
        raise MeshReadError(f"{path}: PLY file has no vertex element")
    if want_faces:
        tris = _check_faces(path, tris if tris is not None else np.zeros((0, 3)), len(verts))
        return verts, tris
    return verts, None


def _read_ply_ascii(path, body: bytes, elements, want_faces: bool):
    lines = body.split(b"\n")
    li = 0
    verts = tris = None
    for el in elements:
        name, count, props = el["name"], el["count"], el["props"]
        rows = lines[li: li + count]
        if len(rows) < count:
            raise MeshReadError(f"{path}: truncated ASCII PLY (element {name!r})")
        li += count
        if name == "vertex":
            names = [p[0] for p in props]
            if any(p[1] == "list" for p in props):
                raise MeshReadError(f"{path}: list property in PLY vertex element is not supported")
            arr = np.array(b" ".join(rows).split(), dtype=np.float64)
            if arr.size != count * len(props):
                raise MeshReadError(f"{path}: ASCII PLY vertex rows have the wrong number of values")
            arr = arr.reshape(count, len(props))
            try:
                verts = arr[:, [names.index("x"), names.index("y"), names.index("z")]].astype(np.float32)
            except ValueError:
                raise MeshReadError(f"{path}: PLY vertex element lacks x/y/z properties") from None
        elif name == "face" and want_faces:
            polys = []
            for r in rows:
                vals = r.split()
                off = 0
                for p in props:
                    if p[1] == "list":
                        n = int(vals[off])
                        if p[0] in ("vertex_indices", "vertex_index"):
                            polys.append([int(v) for v in vals[off + 1: off + 1 + n]])
                        off += 1 + n
                    else:
                        off += 1
            tris = triangulate_polygons(polys)
    if verts is None:
        raise MeshReadError(f"{path}: PLY file has no vertex element")
    if want_faces:
        return verts, _check_faces(path, tris if tris is not None else np.zeros((0, 3)), len(verts))
    return verts, None


def write_ply(path, vertices: np.ndarray, triangles: np.ndarray | None = None, binary: bool = True) -> None:
    """Write a PLY (binary little-endian float32 vertices, uchar/int faces by default, like CoMA)."""
    v = np.asarray(vertices, dtype=np.float32)
    f = np.zeros((0, 3), np.int32) if triangles is None else np.asarray(triangles, dtype=np.int32)
    fmt = "binary_little_endian" if binary else "ascii"
    header = (f"ply\nformat {fmt} 1.0\ncomment facedis\nelement vertex {len(v)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n")
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        if binary:
            fh.write(v.astype("<f4").tobytes())
            rec = np.empty(len(f), dtype=[("n", "u1"), ("i", "<i4", (3,))])
            rec["n"] = 3
            rec["i"] = f
            fh.write(rec.tobytes())
        else:
            fh.write("".join(f"{a:.7g} {b:.7g} {c:.7g}\n" for a, b, c in v).encode())
            fh.write("".join(f"3 {a} {b} {c}\n" for a, b, c in f).encode())


# ---------------------------------------------------------------------------- OBJ


def read_obj(path, faces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the geometry of a Wavefront OBJ (``v``/``f`` records; everything else ignored)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise MeshReadError(f"{path}: cannot be read ({e.strerror or e})") from None
    lines = data.splitlines()
    vlines = [ln for ln in lines if ln[:2] == b"v " or ln[:2] == b"v\t"]
    if not vlines:
        raise MeshReadError(f"{path}: OBJ file has no vertices")
    try:
        rows = [ln.split()[1:4] for ln in vlines]
        v = np.array(rows, dtype=np.float64)
    except ValueError as e:
        raise MeshReadError(f"{path}: malformed OBJ vertex record ({e})") from None
    if v.ndim != 2 or v.shape[1] != 3:
        raise MeshReadError(f"{path}: OBJ vertex records need 3 coordinates")
    verts = v.astype(np.float32)
    if not faces:
        return verts, None
    nv = len(verts)
    polys = []
    all_tri = True
    try:
        for ln in lines:
            if ln[:2] == b"f " or ln[:2] == b"f\t":
                toks = ln.split()[1:]
                idx = [int(t.split(b"/", 1)[0]) for t in toks]
                idx = [i - 1 if i > 0 else nv + i for i in idx]
                if len(idx) != 3:
                    all_tri = False
                polys.append(idx)
    except ValueError as e:
        raise MeshReadError(f"{path}: malformed OBJ face record ({e})") from None
    tris = np.array(polys, dtype=np.int64).reshape(-1, 3) if all_tri else triangulate_polygons(polys)
    return verts, _check_faces(path, tris, nv)


def write_obj(path, vertices: np.ndarray, triangles: np.ndarray | None = None) -> None:
    v = np.asarray(vertices, dtype=np.float64)
    parts = ["# facedis\n", "".join(f"v {a:.6f} {b:.6f} {c:.6f}\n" for a, b, c in v)]
    if triangles is not None:
        parts.append("".join(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in np.asarray(triangles)))
    Path(path).write_text("".join(parts))


# ---------------------------------------------------------------------------- VRML IndexedFaceSet

_VRML_COMMENT_OR_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"|#[^\n\r]*')
_VRML_TOKEN = re.compile(rb'[{}\[\]]|"(?:[^"\\]|\\.)*"|[^\s,{}\[\]"#]+')
_VRML_SKIP = re.compile(rb'[\s,]*')


def _strip_vrml_comments(data: bytes) -> bytes:
    return _VRML_COMMENT_OR_STRING.sub(lambda m: m.group(0) if m.group(0)[:1] == b'"' else b" ", data)


def _numbers(path, blob: bytes, what: str) -> np.ndarray:
    txt = blob.replace(b",", b" ")
    try:
        return np.array(txt.split(), dtype=np.float64)
    except ValueError:
        bad = next(t for t in txt.split() if not _is_number(t))
        raise MeshReadError(f"{path}: non-numeric value {bad[:30]!r} in {what}") from None


def _is_number(t: bytes) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


def read_wrl(path, faces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the ``IndexedFaceSet`` geometry of a VRML 2.0/97 file (BU-3DFE ``*_F3D.wrl``)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise MeshReadError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not raw.lstrip().startswith(b"#VRML"):
        raise MeshReadError(f"{path}: not a VRML file (missing '#VRML' header)")
    data = _strip_vrml_comments(raw)
    n = len(data)
    pos = 0
    stack: list[bytes] = []        # node types of the open '{' blocks
    prev: bytes | None = None      # previous token (field or node name)
    ifs: list[dict] = []           # one dict per IndexedFaceSet: {"point": arr, "coordIndex": arr}
    while True:
        pos = _VRML_SKIP.match(data, pos).end()
        if pos >= n:
            break
        m = _VRML_TOKEN.match(data, pos)
        if m is None:  # pragma: no cover - the token regex matches every non-separator char
            raise MeshReadError(f"{path}: unexpected character at byte {pos}")
        tok = m.group(0)
        pos = m.end()
        if tok == b"{":
            stack.append(prev or b"")
            if prev == b"IndexedFaceSet":
                ifs.append({})
        elif tok == b"}":
            if not stack:
                raise MeshReadError(f"{path}: unbalanced '}}' at byte {m.start()}")
            stack.pop()
        elif tok == b"[":
            # numeric array: jump to its closing bracket and parse it in one go
            nxt = _VRML_SKIP.match(data, pos).end()
            if nxt < n and data[nxt:nxt + 1] not in (b"{",) and not data[nxt:nxt + 1].isalpha() \
                    and data[nxt:nxt + 1] not in (b"]", b'"'):
                close = data.find(b"]", pos)
                if close < 0:
                    raise MeshReadError(f"{path}: unterminated '[' for field {prev!r}")
                owner = stack[-1] if stack else b""
                if prev == b"point" and owner == b"Coordinate":
                    if not ifs or not stack or len(stack) < 2:
                        raise MeshReadError(f"{path}: Coordinate node outside an IndexedFaceSet")
                    if "point" in ifs[-1]:
                        raise MeshReadError(f"{path}: IndexedFaceSet with two Coordinate nodes")
                    ifs[-1]["point"] = _numbers(path, data[pos:close], "Coordinate point")
                elif prev == b"coordIndex" and owner == b"IndexedFaceSet":
                    ifs[-1]["coordIndex"] = _numbers(path, data[pos:close], "coordIndex")
                pos = close + 1
            prev = None
            continue
        elif tok == b"]":
            pass
        else:
            prev = tok
            continue
        prev = None
    if stack:
        raise MeshReadError(f"{path}: truncated VRML file ({len(stack)} unclosed '{{' blocks)")
    if not ifs:
        raise MeshReadError(f"{path}: no IndexedFaceSet node found")
    verts_all, tris_all, offset = [], [], 0
    for k, node in enumerate(ifs):
        if "point" not in node:
            raise MeshReadError(f"{path}: IndexedFaceSet #{k} has no 'coord Coordinate {{ point [...] }}'")
        pts = node["point"]
        if pts.size % 3:
            raise MeshReadError(f"{path}: Coordinate point has {pts.size} values, not a multiple of 3")
        pts = pts.reshape(-1, 3)
        verts_all.append(pts)
        if faces:
            ci = node.get("coordIndex")
            if ci is None:
                raise MeshReadError(f"{path}: IndexedFaceSet #{k} has no coordIndex")
            if not np.all(ci == np.round(ci)):
                raise MeshReadError(f"{path}: non-integer value in coordIndex")
            ci = ci.astype(np.int64)
            if len(ci) % 4 == 0 and (ci[3::4] == -1).all() and (ci.reshape(-1, 4)[:, :3] >= 0).all():
                tri = ci.reshape(-1, 4)[:, :3]
            else:
                cuts = np.flatnonzero(ci < 0)
                if (ci[cuts] != -1).any():
                    raise MeshReadError(f"{path}: negative index other than -1 in coordIndex")
                tri = triangulate_polygons([p[p >= 0] for p in np.split(ci, cuts + 1)])
            if tri.size and (tri.min() < 0 or tri.max() >= len(pts)):
                raise MeshReadError(f"{path}: coordIndex refers to vertex {tri.max()} of {len(pts)}")
            tris_all.append(tri + offset)
        offset += len(pts)
    verts = np.concatenate(verts_all).astype(np.float32)
    if not faces:
        return verts, None
    return verts, _check_faces(path, np.concatenate(tris_all), len(verts))


def write_wrl(path, vertices: np.ndarray, triangles: np.ndarray, per_line: int = 1, comment: bool = True) -> None:
    """Write a BU-3DFE-like VRML 2.0 file (with a TextureCoordinate node to test the parser)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(triangles)
    vs = [f"{a:.6f} {b:.6f} {c:.6f}," for a, b, c in v]
    fs = [f"{a}, {b}, {c}, -1," for a, b, c in f]
    tc = [f"{(i % 7) / 7:.3f} {(i % 5) / 5:.3f}," for i in range(len(v))]

    def block(items):
        return "\n".join(" ".join(items[i:i + per_line]) for i in range(0, len(items), per_line))

    Path(path).write_text(
        "#VRML V2.0 utf8\n"
        + ("# produced by facedis tests { [ not a node ] }\n" if comment else "")
        + "Transform {\n children [\n  Shape {\n   appearance Appearance { texture ImageTexture { url \"x [.bmp\" } }\n"
        + "   geometry DEF face IndexedFaceSet {\n    creaseAngle 3.0\n    coord Coordinate {\n     point [\n"
        + block(vs) + "\n     ]\n    }\n"
        + "    texCoord TextureCoordinate { point [\n" + block(tc) + "\n ] }\n"
        + "    coordIndex [\n" + block(fs) + "\n    ]\n"
        + "    texCoordIndex [ " + " ".join(fs[:3]) + " ]\n"
        + "   }\n  }\n ]\n}\n")


# ---------------------------------------------------------------------------- dispatch

_READERS = {".ply": read_ply, ".obj": read_obj, ".wrl": read_wrl, ".vrml": read_wrl}


def read_mesh(path, faces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Read any mesh: the fast readers above by suffix, ``trimesh`` for other formats."""
    path = os.fspath(path)
    reader = _READERS.get(os.path.splitext(path)[1].lower())
    if reader is not None:
        return reader(path, faces=faces)
    if not os.path.isfile(path):
        raise MeshReadError(f"{path}: cannot be read (no such file)")
    try:
        import trimesh

        m = trimesh.load(path, process=False, force="mesh")
        v = np.asarray(m.vertices, dtype=np.float32)
        f = np.asarray(m.faces, dtype=np.int32) if faces else None
    except Exception as e:  # trimesh raises many kinds
        raise MeshReadError(f"{path}: cannot be read by trimesh ({type(e).__name__}: {e})") from None
    if len(v) == 0:
        raise MeshReadError(f"{path}: mesh has no vertices")
    return v, f

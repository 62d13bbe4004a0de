"""The vectorised half of :mod:`.tarindex`'s bulk path: numpy over many headers at once.

Separate so that numpy is imported only when a tar's headers are read: a reorganize_tar task whose inputs
all carry ``member_offsets`` never pays for the import (about 0.1 s of a whole process's start-up).
"""

from __future__ import annotations

import numpy as np

from .tarindex import BLOCK, Batch, Layout, Pax, _checksum_ok, _decode, _octal

_POW6 = 8 ** np.arange(5, -1, -1, dtype=np.int64)
_POW11 = 8 ** np.arange(10, -1, -1, dtype=np.int64)


def _octal_columns(fields: np.ndarray, digits: int, powers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of fixed-width octal fields written the usual way (``digits`` octal digits, then NUL or space
    to the end), and which rows are written so; the others need :func:`_octal`."""
    body = fields[:, :digits]
    tail = fields[:, digits:]
    clean = ((body >= 48) & (body <= 55)).all(axis=1) & ((tail == 0) | (tail == 32)).all(axis=1)
    return (body.astype(np.int64) - 48) @ powers, clean


def _first_bad_checksum(blocks: np.ndarray) -> int | None:
    """The first row whose header checksum fails (:func:`_checksum_ok`), checked in bulk; None if none."""
    field = blocks[:, 148:156]
    unsigned = blocks.sum(axis=1, dtype=np.int64) - field.sum(axis=1, dtype=np.int64) + 8 * 32
    stored, clean = _octal_columns(field, 6, _POW6)
    for row in np.flatnonzero(~(clean & (stored == unsigned))).tolist():
        if not _checksum_ok(blocks[row].tobytes()):  # other spellings, signed sums: the general check decides
            return row
    return None


def check_batch(blocks: np.ndarray, heads: list[int], sizes: list[int], file_size: int,
                 problems: list[str], paxes: Pax | None = None,
                 pax_blocks: np.ndarray | None = None) -> tuple[Batch, bool]:
    """Checksums, names and mtimes of a chain of plain headers (``blocks``: their copies, one row each;
    ``pax_blocks``: those of the pax headers before some of them, in the order of ``paxes``), vectorised;
    returns the members up to the first bad checksum and whether one was found (then ``problems`` says
    so, as the general parser would)."""
    count, bad_at = len(heads), None
    bad = _first_bad_checksum(blocks)
    if bad is not None:
        count, bad_at = bad, heads[bad]
    if paxes:
        bad = _first_bad_checksum(pax_blocks)
        if bad is not None:
            member, (pax_at, _) = list(paxes.items())[bad]
            if member <= count:  # a member's pax header lies before its header
                count, bad_at = member, pax_at
    corrupt = bad_at is not None
    if corrupt:
        where = "first header" if bad_at == 0 else f"header at byte {bad_at}"
        problems.append(f"corrupt {where} (bad checksum); the rest of the file "
                        f"({file_size - bad_at} bytes) is unreadable")
    blocks, heads, sizes = blocks[:count], heads[:count], sizes[:count]
    name_bytes = np.ascontiguousarray(blocks[:, :100])
    raw_names = name_bytes.view("S100").ravel().tolist()  # trailing NULs dropped
    names = [raw.decode("utf-8", "surrogateescape") for raw in raw_names]
    nonzero = name_bytes != 0
    stripped = 100 - np.argmax(nonzero[:, ::-1], axis=1)  # length with trailing NULs dropped
    inner_nul = np.flatnonzero(nonzero.any(axis=1) & (nonzero.sum(axis=1) != stripped)).tolist()
    for row in inner_nul:
        names[row] = _decode(raw_names[row])  # text after an inner NUL is not part of the name
    prefixed = np.flatnonzero((blocks[:, 257:263] == np.frombuffer(b"ustar\0", np.uint8)).all(axis=1)
                              & (blocks[:, 345] != 0))
    for row in prefixed.tolist():
        names[row] = _decode(blocks[row, 345:500].tobytes()) + "/" + names[row]
    values, clean = _octal_columns(blocks[:, 136:148], 11, _POW11)
    mtimes = values.tolist()
    for row in np.flatnonzero(~clean).tolist():
        try:
            mtimes[row] = _octal(blocks[row, 136:148].tobytes())
        except ValueError:
            mtimes[row] = 0
    regular = [not name.endswith("/") for name in names]
    layout = None
    if not len(prefixed) and count and not inner_nul:
        layout = _layout(name_bytes)
    chains = heads
    if paxes:
        chains = list(heads)
        for member, (pax_at, pax_mtime) in paxes.items():
            if member < count:
                chains[member] = pax_at
                if pax_mtime is not None:
                    mtimes[member] = pax_mtime
    return Batch(names, chains, [h + BLOCK for h in heads], sizes, regular, mtimes, layout), corrupt


_COLUMNS = np.arange(100)


def _layout(raw: np.ndarray) -> Layout | None:
    """Sample grouping of names given as NUL-padded rows of bytes, vectorised: :func:`.tarindex.split_key`,
    metadata and the key comparisons of :func:`.tarindex.group_members` over all rows at once. None when a name is
    not ASCII or a sample would repeat an extension (case-folded): those batches are grouped one member at
    a time, which is exact for every name."""
    if (raw >= 128).any():
        return None  # str.lower beyond ASCII differs from a byte-wise fold
    length = (raw != 0).sum(axis=1)  # no inner NUL here: the caller checked
    width = max(int(length.max(initial=0)), 2)
    raw = raw[:, :width]  # names are mostly short: work on the bytes they use
    columns = _COLUMNS[:width]
    slash = raw == 47
    last_slash = np.where(slash.any(axis=1), width - 1 - np.argmax(slash[:, ::-1], axis=1), -1)
    dot_mask = (raw == 46) & (columns > last_slash[:, None])
    has_dot = dot_mask.any(axis=1)
    dot = np.argmax(dot_mask, axis=1)
    ends_in_slash = np.take_along_axis(raw, np.maximum(length - 1, 0)[:, None], axis=1)[:, 0] == 47
    metadata = ((last_slash < 0) & (raw[:, 0] == 95) & (raw[:, 1] == 95)
                & (np.take_along_axis(raw, np.maximum(length - 1, 0)[:, None], axis=1)[:, 0] == 95)
                & (np.take_along_axis(raw, np.maximum(length - 2, 0)[:, None], axis=1)[:, 0] == 95)
                & (length >= 2))
    keep = has_dot & (dot > last_slash + 1) & (dot != length - 1) & ~metadata & ~ends_in_slash
    rows = raw[keep]
    dot = dot[keep]
    if not len(rows):
        return Layout(keep.tolist(), [], [])
    keys = np.where(columns < dot[:, None], rows, 0)
    key_text = np.ascontiguousarray(keys).view(f"S{width}").ravel()
    new_key = np.ones(len(rows), dtype=bool)
    new_key[1:] = key_text[1:] != key_text[:-1]
    upper = (rows >= 65) & (rows <= 90)
    exts = np.where(columns > dot[:, None], rows + 32 * upper, 0).astype(np.uint8)
    ext_text = np.ascontiguousarray(exts).view(f"S{width}").ravel()
    run = np.cumsum(new_key)
    starts = np.flatnonzero(new_key)
    longest = int(np.diff(np.append(starts, len(rows))).max())
    if longest > 8:  # long runs: sort each run's extensions to find a repeat
        order = np.lexsort((ext_text, run))
        repeated = ((run[order][1:] == run[order][:-1]) & (ext_text[order][1:] == ext_text[order][:-1])).any()
    else:  # compare each member with the few before it in its run
        repeated = any(((run[d:] == run[:-d]) & (ext_text[d:] == ext_text[:-d])).any() for d in range(1, longest))
    if repeated:
        return None  # an extension repeats within a key: webdataset starts a new sample there
    return Layout(keep.tolist(), dot.tolist(), starts.tolist())


class ChainScan:
    """The vectorised first pass: every 512-byte block of the file that looks like a plain ustar header.

    Finding headers needs no sequential walk when one can test every block at once: numpy checks the
    ``ustar`` magic, the type flag and the size field of all blocks of the mapped file (strided reads,
    one cache line per block), and each candidate's size gives the block its successor would be in. The
    headers are then the chain of candidates starting where the parse stands, each the successor of the
    one before; candidates off that chain (data that happens to look like a header) are never visited,
    because the chain is followed from its start by the same arithmetic as a sequential walk. Where the
    chain reaches a block that is not a candidate, :func:`.tarindex._walk` and the general parser take over.
    """

    def __init__(self, blocks: np.ndarray, file_size: int):
        rows = np.flatnonzero(blocks[:, 257] == 117)  # "u" of "ustar": one strided read per block
        head = blocks[rows]  # copies of the candidates
        plain = ((head[:, 258] == 115) & (head[:, 259] == 116) & (head[:, 260] == 97) & (head[:, 261] == 114)
                 & (head[:, 0] != 0) & ((head[:, 156] == 48) | (head[:, 156] == 0)))
        rows, head = rows[plain], head[plain]
        sizes, clean = _octal_columns(head[:, 124:136], 11, _POW11)
        ends = rows * BLOCK + BLOCK + sizes
        keep = clean & (ends <= file_size)
        self.rows, self.head, self.sizes = rows[keep], head[keep], sizes[keep]
        self.next = self.rows + 1 + (self.sizes + (BLOCK - 1)) // BLOCK  # where each one's successor is
        linked = self.next[:-1] == self.rows[1:]
        self.breaks = np.flatnonzero(~linked)  # candidate i is not followed by candidate i + 1

    def chain(self, offset: int, limit: int) -> tuple[np.ndarray, int]:
        """Indices (into the candidates) of the chain of plain headers starting at byte ``offset``, at most
        ``limit`` of them, and the byte offset just after it (where the next header is)."""
        rows, breaks = self.rows, self.breaks
        at = offset // BLOCK
        j = int(np.searchsorted(rows, at))
        pieces: list[np.ndarray] = []
        taken = 0
        while j < len(rows) and rows[j] == at and offset % BLOCK == 0 and taken < limit:
            b = int(np.searchsorted(breaks, j))
            last = int(breaks[b]) if b < len(breaks) else len(rows) - 1  # chain runs j..last
            last = min(last, j + limit - taken - 1)
            pieces.append(np.arange(j, last + 1))
            taken += last + 1 - j
            at = int(self.next[last])
            offset = at * BLOCK
            j = int(np.searchsorted(rows, at))  # skips candidates that lay in data
        if not pieces:
            return np.empty(0, dtype=np.int64), offset
        return np.concatenate(pieces), offset

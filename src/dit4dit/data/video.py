"""Video encoding and exact, timestamp-addressed random-access decoding with PyAV.

Reading
-------
:class:`VideoReader` opens one video file and returns the frames that given timestamps name,
exactly: a timestamp selects the frame whose presentation time lies within ``tolerance``
(half a frame by default) of it, or the read fails with :class:`DatasetError`. It never
substitutes a neighbouring frame.

On first use the reader demuxes the file once (packets only, no decoding) to learn the
presentation timestamp of every frame and which frames are keyframes. A request then

* maps each timestamp to an exact frame (or fails: missing frame, video too short);
* decodes forward from where the decoder already is when no keyframe lies between the last
  decoded frame and the target (sequential requests never re-seek);
* otherwise seeks to the nearest keyframe at or before the target and decodes forward.

Readers keep their container and decoder open; :class:`VideoReaderPool` caches them per file
(LRU-bounded) and is fork-aware, so a pool inherited by a DataLoader worker reopens its files
instead of sharing FFmpeg state with the parent.

Writing
-------
:class:`VideoEncoder` appends uint8 RGB frames to one file, frame ``n`` at ``t = n / fps``,
so several episodes can be concatenated into one file with known ``from``/``to``
timestamps. ``resolve_encoder`` picks an encoder that really opens here (``libx264`` for
H.264, falling back to other encoders shipped with PyAV's FFmpeg).
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

import av
from av.video.reformatter import VideoReformatter

__all__ = [
    "DatasetError",
    "VideoInfo",
    "probe_video",
    "VideoReader",
    "VideoReaderPool",
    "VideoEncoder",
    "resolve_encoder",
]


class DatasetError(Exception):
    """A dataset on disk is missing, malformed or inconsistent.

    The message names the file, the episode and the key concerned and what is wrong.
    (Defined here so the video layer can raise it; re-exported by ``dit4dit.data.lerobot``.)
    """


# ----------------------------------------------------------------------------------------------
# probing


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    codec: str
    width: int
    height: int
    fps: float | None  # average frame rate from the container, if known
    num_frames: int  # from the container header (0 when unknown)
    start: float  # seconds, presentation time of the stream start
    duration: float | None  # seconds, from the container header

    @property
    def end(self) -> float | None:
        return None if self.duration is None else self.start + self.duration


def _open_input(path: Path):
    try:
        container = av.open(str(path), mode="r")
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: video file not found") from e
    except (av.FFmpegError, OSError) as e:
        raise DatasetError(f"{path}: cannot open video: {e}") from e
    if not container.streams.video:
        container.close()
        raise DatasetError(f"{path}: file has no video stream")
    return container


def probe_video(path: str | Path) -> VideoInfo:
    """Header-only facts about the first video stream of ``path`` (no decoding)."""
    path = Path(path)
    container = _open_input(path)
    try:
        st = container.streams.video[0]
        tb = st.time_base
        start = float(st.start_time * tb) if (st.start_time is not None and tb) else 0.0
        if st.duration is not None and tb:
            duration = float(st.duration * tb)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = None
        rate = st.average_rate or st.guessed_rate
        return VideoInfo(
            path=path,
            codec=st.codec_context.name,
            width=st.codec_context.width,
            height=st.codec_context.height,
            fps=float(rate) if rate else None,
            num_frames=int(st.frames or 0),
            start=start,
            duration=duration,
        )
    finally:
        container.close()


# ----------------------------------------------------------------------------------------------
# reading


class VideoReader:
    """Exact timestamp -> frame decoding of one video file, with a persistent decoder.

    Thread-safe (one lock per file). Not fork-safe by itself: use :class:`VideoReaderPool`.
    """

    def __init__(self, path: str | Path, thread_type: str | None = None):
        self.path = Path(path)
        self._thread_type = thread_type
        self._lock = threading.RLock()
        self._container = None
        self._stream = None
        self._gen = None  # live decode generator, or None (seek needed)
        self._pos: int | None = None  # index (into _pts) of the last frame the decoder output
        self._last: tuple[int, np.ndarray] | None = None
        self._reformatter = None
        # index (built on open): sorted presentation timestamps and keyframe positions
        self._pts: np.ndarray | None = None
        self._times: np.ndarray | None = None
        self._key_idx: list[int] = []
        self._tb: Fraction | None = None
        self.pid = os.getpid()

    # -- lifecycle -------------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._container is not None:
            return
        container = _open_input(self.path)
        st = container.streams.video[0]
        if self._thread_type:
            st.codec_context.thread_type = self._thread_type
        tb = st.time_base
        pts, keys = [], []
        try:
            for pkt in container.demux(st):
                t = pkt.pts if pkt.pts is not None else pkt.dts
                if t is None:
                    if pkt.size == 0:  # flush packet
                        continue
                    raise DatasetError(f"{self.path}: video packets carry no timestamps; cannot seek exactly")
                pts.append(t)
                keys.append(bool(pkt.is_keyframe))
        except av.FFmpegError as e:
            container.close()
            raise DatasetError(f"{self.path}: corrupt video (while indexing packets): {e}") from e
        if not pts:
            container.close()
            raise DatasetError(f"{self.path}: video stream holds no frames")
        order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
        pts_arr = np.asarray(pts, dtype=np.int64)[order]
        keys_arr = np.asarray(keys, dtype=bool)[order]
        if np.any(np.diff(pts_arr) == 0):
            # duplicate timestamps (should not happen in a sane file): keep the first of each
            keep = np.concatenate([[True], np.diff(pts_arr) != 0])
            pts_arr, keys_arr = pts_arr[keep], keys_arr[keep]
        self._container, self._stream, self._tb = container, st, tb
        self._pts = pts_arr
        self._times = pts_arr.astype(np.float64) * float(tb)
        self._key_idx = np.flatnonzero(keys_arr).tolist()
        self._gen, self._pos, self._last = None, None, None

    def close(self) -> None:
        with self._lock:
            if self._container is not None:
                try:
                    self._container.close()
                except Exception:  # noqa: BLE001 - closing must not raise
                    pass
            self._container = self._stream = self._gen = None
            self._pos = self._last = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- facts -----------------------------------------------------------------------------
    @property
    def frame_times(self) -> np.ndarray:
        """Presentation time (s) of every frame in the file, ascending."""
        with self._lock:
            self._ensure_open()
            return self._times.copy()

    @property
    def num_frames(self) -> int:
        with self._lock:
            self._ensure_open()
            return int(self._pts.size)

    def _default_tolerance(self) -> float:
        if self._times.size > 1:
            return 0.5 * float(np.median(np.diff(self._times)))
        return 1e-3

    # -- lookup ----------------------------------------------------------------------------
    def locate(self, times: Sequence[float], tolerance: float | None = None) -> np.ndarray:
        """Index of the frame each timestamp names; DatasetError when none lies within tolerance."""
        with self._lock:
            self._ensure_open()
            tol = self._default_tolerance() if tolerance is None else float(tolerance)
            t = np.asarray(times, dtype=np.float64).reshape(-1)
            ft = self._times
            j = np.clip(np.searchsorted(ft, t), 1, max(ft.size - 1, 1))
            if ft.size == 1:
                idx = np.zeros(t.shape, dtype=np.int64)
            else:
                left_closer = np.abs(t - ft[j - 1]) <= np.abs(ft[j] - t)
                idx = np.where(left_closer, j - 1, j)
            err = np.abs(ft[idx] - t)
            bad = np.flatnonzero(~(err < tol))
            if bad.size:
                b = int(bad[0])
                tb = float(t[b])
                if tb > ft[-1]:
                    why = (
                        f"video is too short: it ends with a frame at t={ft[-1]:.6f}s "
                        f"({ft.size} frames) but t={tb:.6f}s is requested"
                    )
                elif tb < ft[0]:
                    why = f"timestamp t={tb:.6f}s lies before the first frame (t={ft[0]:.6f}s)"
                else:
                    why = (
                        f"no frame within {tol:.6f}s of t={tb:.6f}s "
                        f"(nearest frame at t={ft[idx[b]]:.6f}s)"
                    )
                raise DatasetError(f"{self.path}: {why}")
            return idx

    # -- decoding --------------------------------------------------------------------------
    def read(self, times: Sequence[float], tolerance: float | None = None) -> np.ndarray:
        """uint8 (n, H, W, 3) RGB frames named exactly by ``times`` (seconds), in request order."""
        with self._lock:
            idx = self.locate(times, tolerance)
            if idx.size == 0:
                return np.zeros((0, 0, 0, 3), dtype=np.uint8)
            decoded: dict[int, np.ndarray] = {}
            for j in sorted(set(idx.tolist())):
                decoded[j] = self._decode_index(j)
            return np.stack([decoded[j] for j in idx.tolist()])

    def _seek_to_key(self, key_pos: int | None) -> None:
        """Seek so that decoding restarts at keyframe ``key_pos`` (index into _pts) or file start."""
        st = self._stream
        if key_pos is None:
            target = int(self._pts[0]) - 1
        else:
            target = int(self._pts[key_pos])
        try:
            self._container.seek(target, stream=st, backward=True, any_frame=False)
        except av.FFmpegError:
            # some demuxers refuse timestamps before the start: rewind to the beginning
            self._container.seek(0, backward=True, any_frame=False)
        self._gen = self._container.decode(st)
        self._pos = None

    def _decode_index(self, j: int) -> np.ndarray:
        if self._last is not None and self._last[0] == j:
            return self._last[1]
        self._ensure_open()
        target = int(self._pts[j])
        kp = bisect.bisect_right(self._key_idx, j) - 1  # position in _key_idx of keyframe <= j
        key_j = self._key_idx[kp] if kp >= 0 else None
        can_continue = (
            self._gen is not None
            and self._pos is not None
            and self._pos < j
            # decoding on costs (j - pos) frames; a seek costs (j - key_j + 1) frames plus the
            # seek itself: continue unless a keyframe lies well between
            and (key_j is None or self._pos >= key_j - 3)
        )
        # candidates to restart from, nearest first; the last resort is the file start
        candidates: list[int | None] = []
        if not can_continue:
            candidates = [self._key_idx[k] for k in range(kp, max(kp - 3, -1), -1)] + [None]
        attempt = 0
        while True:
            just_seeked = False
            if not can_continue:
                self._seek_to_key(candidates[attempt])
                just_seeked = True
            overshoot = False
            try:
                for frame in self._gen:
                    fp = frame.pts if frame.pts is not None else frame.dts
                    if fp is None:
                        continue
                    if fp < target:
                        self._pos = self._index_of(fp)
                        just_seeked = False
                        continue
                    if fp == target:
                        img = self._to_rgb(frame)
                        self._pos = j
                        self._last = (j, img)
                        return img
                    overshoot = True
                    self._pos = self._index_of(fp)
                    break
            except av.FFmpegError as e:
                self._gen, self._pos = None, None
                raise DatasetError(
                    f"{self.path}: decoding failed near t={self._times[j]:.6f}s: {e}"
                ) from e
            if not overshoot:  # decoder exhausted without producing the frame
                self._gen, self._pos = None, None
                raise DatasetError(
                    f"{self.path}: video ended before the frame at t={self._times[j]:.6f}s could be "
                    f"decoded (is the file truncated?)"
                )
            # overshoot: the seek landed after the target (or the frame was never output)
            if just_seeked and attempt + 1 < len(candidates):
                attempt += 1
                can_continue = False
                continue
            if can_continue:  # continued decoding skipped the frame: retry once with a seek
                can_continue = False
                candidates = [self._key_idx[k] for k in range(kp, max(kp - 3, -1), -1)] + [None]
                attempt = 0
                continue
            self._gen, self._pos = None, None
            raise DatasetError(
                f"{self.path}: the decoder never output the frame at t={self._times[j]:.6f}s"
            )

    def _to_rgb(self, frame) -> np.ndarray:
        # A persistent single-threaded swscale context: frame.to_ndarray(format=...) builds a
        # new (multi-threaded) one per call, which costs milliseconds on small frames.
        if self._reformatter is None:
            self._reformatter = VideoReformatter()
        try:
            rgb = self._reformatter.reformat(frame, format="rgb24", threads=1)
        except TypeError:  # PyAV without the threads argument
            rgb = self._reformatter.reformat(frame, format="rgb24")
        return np.ascontiguousarray(rgb.to_ndarray())

    def _index_of(self, pts: int) -> int | None:
        k = int(np.searchsorted(self._pts, pts))
        if k < self._pts.size and self._pts[k] == pts:
            return k
        # a frame not seen in the packet index: position just before the next indexed frame
        return k - 1 if k > 0 else None


class VideoReaderPool:
    """LRU pool of open :class:`VideoReader` objects keyed by path; fork- and pickle-aware."""

    def __init__(self, max_open: int = 32, thread_type: str | None = None):
        self.max_open = max(1, int(max_open))
        self.thread_type = thread_type
        self._readers: OrderedDict[Path, VideoReader] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self, path: str | Path) -> VideoReader:
        path = Path(path)
        with self._lock:
            if self._pid != os.getpid():
                # inherited through fork: never touch the parent's FFmpeg state, just drop it
                self._readers = OrderedDict()
                self._pid = os.getpid()
            r = self._readers.get(path)
            if r is not None:
                self._readers.move_to_end(path)
                return r
            r = VideoReader(path, thread_type=self.thread_type)
            self._readers[path] = r
            while len(self._readers) > self.max_open:
                _, old = self._readers.popitem(last=False)
                old.close()
            return r

    def read(self, path: str | Path, times: Sequence[float], tolerance: float | None = None) -> np.ndarray:
        return self.get(path).read(times, tolerance)

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for r in self._readers.values():
                    r.close()
            self._readers = OrderedDict()

    def __getstate__(self):
        return {"max_open": self.max_open, "thread_type": self.thread_type}

    def __setstate__(self, state):
        self.__init__(state["max_open"], state["thread_type"])


# ----------------------------------------------------------------------------------------------
# writing

_ENCODER_CANDIDATES = {
    "h264": ["libx264", "libopenh264"],
    "libx264": ["libx264", "libopenh264"],
    "hevc": ["libx265"],
    "h265": ["libx265"],
    "libx265": ["libx265"],
    "av1": ["libsvtav1", "libaom-av1", "libdav1d"],
    "libsvtav1": ["libsvtav1", "libaom-av1"],
    "libaom-av1": ["libaom-av1", "libsvtav1"],
    "vp9": ["libvpx-vp9"],
    "libvpx-vp9": ["libvpx-vp9"],
    "mpeg4": ["mpeg4"],
}
_FALLBACK_ORDER = ["libx264", "libopenh264", "libsvtav1", "libaom-av1", "libvpx-vp9", "libx265", "mpeg4"]
_encoder_ok_cache: dict[str, bool] = {}


def _encoder_works(name: str) -> bool:
    """True when encoder ``name`` exists in this FFmpeg build and really opens (hardware ones may not)."""
    if name in _encoder_ok_cache:
        return _encoder_ok_cache[name]
    ok = False
    try:
        cc = av.CodecContext.create(name, "w")
        cc.width, cc.height = 64, 64
        cc.pix_fmt = "yuv420p"
        cc.time_base = Fraction(1, 25)
        cc.framerate = Fraction(25, 1)
        cc.open()
        ok = True
        try:
            cc.close()
        except Exception:  # noqa: BLE001 - older PyAV has no close
            pass
    except Exception:  # noqa: BLE001 - unknown codec, hardware missing, ...
        ok = False
    _encoder_ok_cache[name] = ok
    return ok


def resolve_encoder(codec: str) -> str:
    """Name of a working FFmpeg encoder for ``codec`` ("h264", "av1", "libx264", ...).

    Tries the encoders that produce the requested codec first, then a fixed fallback order;
    raises RuntimeError when nothing usable exists.
    """
    wanted = _ENCODER_CANDIDATES.get(codec, [codec])
    for name in list(wanted) + [n for n in _FALLBACK_ORDER if n not in wanted]:
        if _encoder_works(name):
            return name
    raise RuntimeError(f"no usable video encoder for {codec!r} in this PyAV/FFmpeg build")


def _fps_fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001000)


class VideoEncoder:
    """Append RGB uint8 frames to one video file; frame ``n`` is shown at ``n / fps`` seconds.

    ``gop`` is the keyframe interval in frames (small = faster random access, larger files).
    """

    def __init__(
        self,
        path: str | Path,
        fps: float,
        width: int,
        height: int,
        codec: str = "h264",
        crf: int = 20,
        gop: int | None = 8,
        pix_fmt: str = "yuv420p",
        options: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.fps = fps
        self.width, self.height = int(width), int(height)
        self.encoder = resolve_encoder(codec)
        self.codec = av.codec.Codec(self.encoder, "w").canonical_name
        if pix_fmt == "yuv420p" and (self.width % 2 or self.height % 2):
            if self.encoder == "libx264":
                pix_fmt = "yuv444p"  # 4:2:0 needs even sizes; x264 encodes 4:4:4 instead
            else:
                raise ValueError(
                    f"{self.path}: {self.width}x{self.height} frames need even sizes for yuv420p "
                    f"with encoder {self.encoder}"
                )
        self.pix_fmt = pix_fmt
        self.num_frames = 0
        self.bytes_muxed = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.encoder == "libsvtav1":
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner to stderr otherwise
        self._container = av.open(str(self.path), mode="w")
        try:
            rate = _fps_fraction(fps)
            st = self._container.add_stream(self.encoder, rate=rate)
            st.width, st.height, st.pix_fmt = self.width, self.height, pix_fmt
            opts = self._quality_options(crf)
            if gop:
                st.codec_context.gop_size = int(gop)
                if self.encoder in ("libx264", "libx265", "libsvtav1", "libvpx-vp9", "libaom-av1"):
                    opts.setdefault("g", str(int(gop)))
            if options:
                opts.update({str(k): str(v) for k, v in options.items()})
            st.codec_context.options = opts
            self._stream = st
        except Exception:
            self._container.close()
            raise

    def _quality_options(self, crf: int) -> dict[str, str]:
        e = self.encoder
        if e == "libx264":
            # no B-frames: the decoder can output a frame as soon as it has read it, which
            # makes random access faster at the small GOPs used for training data
            return {"crf": str(crf), "preset": "veryfast", "bf": "0"}
        if e == "libx265":
            return {"crf": str(crf), "preset": "fast", "x265-params": "log-level=error"}
        if e == "libsvtav1":
            return {"crf": str(min(max(crf, 1), 63)), "preset": "8"}
        if e == "libaom-av1":
            return {"crf": str(min(max(crf, 0), 63)), "cpu-used": "6"}
        if e == "libvpx-vp9":
            return {"crf": str(min(max(crf, 0), 63)), "b": "0", "deadline": "realtime", "cpu-used": "8"}
        if e == "mpeg4":
            q = int(min(31, max(1, round(crf / 10))))
            return {"flags": "+qscale", "global_quality": str(q * 118)}
        return {}

    def write(self, frames: np.ndarray) -> None:
        """Append frames: uint8 (T, H, W, 3) or one (H, W, 3)."""
        arr = np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"{self.path}: frames must be uint8 (T, {self.height}, {self.width}, 3); "
                f"got {arr.dtype} {arr.shape}"
            )
        st = self._stream
        for img in arr:
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            f.pts = self.num_frames
            self.num_frames += 1
            for pkt in st.encode(f):
                self.bytes_muxed += pkt.size
                self._container.mux(pkt)

    @property
    def size_bytes(self) -> int:
        """Bytes written so far (lags the input by the encoder's lookahead)."""
        try:
            on_disk = self.path.stat().st_size
        except OSError:
            on_disk = 0
        return max(on_disk, self.bytes_muxed)

    def close(self) -> None:
        if self._container is None:
            return
        try:
            for pkt in self._stream.encode(None):
                self._container.mux(pkt)
        finally:
            self._container.close()
            self._container = None

    def abort(self) -> None:
        """Close without caring whether the file is valid (used when a write is abandoned)."""
        if self._container is None:
            return
        try:
            self._container.close()
        except Exception:  # noqa: BLE001
            pass
        self._container = None

    def __enter__(self) -> "VideoEncoder":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

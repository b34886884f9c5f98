"""Writing a pyramid as a DICOM-WSI series: one VL Whole Slide Microscopy instance per level, each
TILED_FULL with baseline-JPEG frames, all sharing one study, series and frame of reference.

Used by the synthetic-slide generator so the DICOM reader is tested on real files.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import UID, JPEGBaseline8Bit, generate_uid

WSI_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.6")  # VL Whole Slide Microscopy Image Storage
_THICKNESS_MM = 0.001


@dataclass(frozen=True)
class SeriesIds:
    study: str
    series: str
    frame_of_reference: str

    @classmethod
    def derived(cls, seed: int) -> SeriesIds:
        """UIDs that are the same each time a slide of this seed is written."""
        return cls(*(generate_uid(entropy_srcs=[f"slidestream-{seed}-{part}"]) for part in range(3)))


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality)  # 4:2:0, like most scanners
    return buf.getvalue()


def _level_dataset(
    ids: SeriesIds, level: int, size: tuple[int, int], tile: int, mpp: float | None, n_frames: int
) -> Dataset:
    width, height = size
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[ids.series, str(level)])
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = WSI_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ids.study, ids.series
    ds.FrameOfReferenceUID = ids.frame_of_reference
    ds.Modality = "SM"
    ds.Manufacturer = "slidestream synthetic"
    ds.ContainerIdentifier = "synthetic"
    base = level == 0
    ds.ImageType = ["ORIGINAL" if base else "DERIVED", "PRIMARY", "VOLUME", "NONE" if base else "RESAMPLED"]
    ds.InstanceNumber = level + 1
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.NumberOfFrames = n_frames
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "0"
    ds.OpticalPathSequence = Sequence([optical_path])
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = origin.YOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    if mpp is not None:
        spacing_mm = mpp / 1000
        measures = Dataset()
        measures.PixelSpacing = [spacing_mm, spacing_mm]
        measures.SliceThickness = _THICKNESS_MM
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * spacing_mm, height * spacing_mm
        ds.ImagedVolumeDepth = _THICKNESS_MM
    return ds


def write_dicom_series(
    folder: str | os.PathLike,
    levels: list[tuple[int, int, int]],
    level_tiles: Callable[[int, int, int], Iterator[np.ndarray]],
    tile: int,
    mpp: float | None,
    quality: int,
    ids: SeriesIds,
) -> list[str]:
    """Write `levels` ((downsample, width, height), level 0 first) into `folder` as `level_<i>.dcm`.

    `level_tiles(downsample, width, height)` yields the level's full `tile`-sized RGB tiles in row-major
    order. Returns the paths written.
    """
    os.makedirs(folder, exist_ok=True)
    paths = []
    for level, (downsample, width, height) in enumerate(levels):
        n_frames = math.ceil(width / tile) * math.ceil(height / tile)
        frames = [_jpeg(t, quality) for t in level_tiles(downsample, width, height)]
        if len(frames) != n_frames:
            raise ValueError(f"level {level}: {len(frames)} tiles for a {n_frames}-tile grid")
        level_mpp = None if mpp is None else mpp * downsample
        ds = _level_dataset(ids, level, (width, height), tile, level_mpp, n_frames)
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        path = os.path.join(os.fspath(folder), f"level_{level}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

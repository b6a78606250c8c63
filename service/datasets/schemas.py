from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class ResizedFrom(BaseModel):
    height: int
    width: int
    count: int = Field(description="images of this size in the upload")


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"example": {
        "id": "0b6f9c1e-2a51-4c1e-9a4e-5f3d2b7c8a10", "name": "digits_train.npz",
        "n_samples": 120, "channels": 1, "height": 8, "width": 8,
        "sha256": "9f2c…", "size_bytes": 7808, "created_at": "2026-11-29T12:00:00Z"}})

    id: str
    name: str
    n_samples: int = Field(description="number of images")
    channels: int = Field(description="1 (grey) or 3 (RGB)")
    height: int
    width: int
    sha256: str = Field(description="sha256 of the stored uint8 (N, C, H, W) .npy bytes")
    size_bytes: int = Field(description="size of the stored array")
    created_at: datetime
    resized_from: list[ResizedFrom] | None = Field(
        None, description="The sizes of the images that were resized to the dataset's "
        "height x width (images of different sizes in one upload are resized to the most "
        "common size); null when none were. Jobs then resize train and test images to "
        "their working size (the job's `spec.images`)")


class DatasetList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"items": [{
        "id": "0b6f9c1e-2a51-4c1e-9a4e-5f3d2b7c8a10", "name": "digits_train.npz",
        "n_samples": 120, "channels": 1, "height": 8, "width": 8, "sha256": "9f2c…",
        "size_bytes": 7808, "created_at": "2026-11-29T12:00:00Z"}], "total": 1}})

    items: list[DatasetOut]
    total: int

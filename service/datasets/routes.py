from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile, status

from service.datasets import service
from service.datasets.schemas import DatasetList, DatasetOut
from service.deps import IdempotencyKeyDep, SessionDep, SettingsDep, StreamTenantDep, TenantDep
from service.errors import AppError, PayloadTooLarge, error_responses
from service.params import DatasetId, Limit, Offset, reject_unknown_query_params

router = APIRouter(prefix="/v1/datasets", tags=["datasets"],
                   dependencies=[Depends(reject_unknown_query_params)])


LOCATION = {"description": "/v1/datasets/{id}", "schema": {"type": "string"}}


def upload_size(upload: UploadFile) -> int:
    upload.file.seek(0, 2)
    size = upload.file.tell()
    upload.file.seek(0)
    return size


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut,
             responses={
                 201: {"description": "Created", "headers": {"Location": LOCATION}},
                 200: {"model": DatasetOut, "description": (
                     "The same content with the same name was uploaded before: that "
                     "dataset, with `Dataset-Existing: true`"),
                     "headers": {"Location": LOCATION, "Dataset-Existing": {
                         "description": "true", "schema": {"type": "string"}}}},
                 **error_responses(400, 401, 403, 409, 413, 422, 503)},
             summary="Upload an image set (.npz, .npy, or .zip of PNG/JPEG)",
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {
                 "example": {"file": "(the file's bytes, e.g. curl -F file=@train.npz)",
                             "name": "line-3 train"}}}}})
def upload_dataset(
    settings: SettingsDep,
    tenant: StreamTenantDep,
    request: Request,
    response: Response,
    file: Annotated[UploadFile, File(description=".npz (one array or key images/x), .npy, "
                                                 "or .zip of PNG/JPEG files")],
    name: Annotated[str | None, Form(max_length=255)] = None,
    idempotency_key: IdempotencyKeyDep = None,
) -> DatasetOut:
    """201 with a new dataset; 200 with `Dataset-Existing: true` when this tenant already
    has a dataset of the same content (sha256 of the stored array) and name. Both carry
    `Location: /v1/datasets/{id}`. No database connection is held while the upload is
    decoded (the tenant's key is checked with a short one of its own)."""
    metrics = request.app.state.metrics
    try:
        size = upload_size(file)
        if size > settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"upload is larger than the limit of {settings.max_upload_bytes} bytes")
        metrics.upload_bytes.inc(size)
        created = service.create_dataset(request.app.state.session_factory, tenant,
                                         file.file, file.filename or "", name, settings,
                                         idempotency_key)
    except AppError:
        metrics.uploads.labels("refused").inc()
        raise
    metrics.uploads.labels(created.outcome).inc()
    response.headers["Location"] = f"/v1/datasets/{created.dataset.id}"
    if created.outcome == "replayed":
        response.headers["Idempotent-Replayed"] = "true"
    elif created.outcome == "existing":
        response.status_code = status.HTTP_200_OK
        response.headers["Dataset-Existing"] = "true"
    return DatasetOut.model_validate(created.dataset)


@router.get("", response_model=DatasetList, responses=error_responses(401, 422),
            summary="List your datasets, newest first")
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: Limit = 100,
    offset: Offset = 0,
) -> DatasetList:
    rows, total = service.list_datasets(session, tenant, limit, offset)
    return DatasetList(items=[DatasetOut.model_validate(r) for r in rows], total=total)


@router.get("/{dataset_id}", response_model=DatasetOut,
            responses=error_responses(401, 404, 422), summary="Describe a dataset")
def get_dataset(session: SessionDep, tenant: TenantDep, dataset_id: DatasetId) -> DatasetOut:
    return DatasetOut.model_validate(service.get_dataset(session, tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses=error_responses(401, 404, 409, 422),
               summary="Delete a dataset (409 while a job uses it: delete the job first)")
def delete_dataset(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                   dataset_id: DatasetId) -> Response:
    service.delete_dataset(session, tenant, dataset_id, settings)
    return Response(status_code=status.HTTP_204_NO_CONTENT)

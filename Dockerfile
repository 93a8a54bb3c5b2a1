# gradserve server image. Built by `make image` (podman); see "Deployment" in README.md.
#
# Everything is installed from wheels that `make image` builds on the host first, with
# --no-index: the build needs no network and no registry configuration, and the final image
# holds no compiler, test, wheel or package cache.
#   BASE        a Debian-based image with python3 (3.11) and its venv module.
#               Default: the public python:3.11-slim; `make image` passes a local base
#               built from Debian packages where no registry can be reached.
#   WHEELS      folder (in the build context) of every dependency's wheel, gradserve's excluded:
#               build/wheels/cpu or build/wheels/gpu.
#   TENSORFLOW  the TensorFlow requirement: tensorflow (CPU) or tensorflow[and-cuda] (GPU).
#   VERSION     gradserve's version; its wheel is build/wheels/app/gradserve-VERSION-*.whl.
ARG BASE=python:3.11-slim

# Stage 1: the dependencies (TensorFlow and the rest) in a virtual environment. This large
# layer is rebuilt only when the dependency wheels change, not when gradserve's code does.
FROM ${BASE} AS dependencies
ARG WHEELS=build/wheels/cpu
ARG TENSORFLOW="tensorflow==2.21.*"
COPY ${WHEELS} /tmp/wheels
RUN python3 -m venv /opt/gradserve \
    && /opt/gradserve/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        "${TENSORFLOW}" /tmp/wheels/*.whl

# Stage 2: the runtime image: that environment on a clean base, then gradserve itself
# (with its bundled models), installed from a bind mount so the wheel stays out of the image.
FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="gradserve" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.description="gRPC server for a Keras model's output and its input derivatives"
COPY --from=dependencies /opt/gradserve /opt/gradserve
RUN --mount=type=bind,source=build/wheels/app,target=/tmp/app \
    /opt/gradserve/bin/pip install --no-cache-dir --no-index --no-deps \
        "/tmp/app/gradserve-${VERSION}-py3-none-any.whl"
# A numeric user, so that Kubernetes' runAsNonRoot can check it; HOME is writable for Keras.
ENV PATH=/opt/gradserve/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=1
USER 10001:10001
EXPOSE 50051 8000 9400
STOPSIGNAL SIGTERM
ENTRYPOINT ["gradserve"]
CMD ["serve", "--host", "0.0.0.0"]

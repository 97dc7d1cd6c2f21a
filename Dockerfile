# The r1serve image: Ray's own image (what KubeRay runs in the Ray pods) with r1serve installed.
# One image runs the operator (the chart's `image`, manifests/operator.yaml) and the Ray head and
# workers (the chart's `rayPods.defaultImage`, or spec.workers.image).
#
#   CPU: docker build -t ghcr.io/r1serve/r1serve:0.1.0 .
#   GPU: docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu \
#          --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#          -t ghcr.io/r1serve/r1serve:0.1.0-gpu .
#
# Model weights are not baked in: mount them (spec.model.source names the directory).
ARG BASE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# torch first, from the chosen wheel index: r1serve's plain `torch` requirement would otherwise
# pull PyPI's default build (CUDA) into a CPU image.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# Ray's images run as `ray` (uid 1000, group users 100), as the rendered pods require.
COPY --chown=1000:100 . /tmp/r1serve-src
RUN pip install --no-cache-dir "/tmp/r1serve-src[operator,nixl]" && rm -rf /tmp/r1serve-src
USER 1000

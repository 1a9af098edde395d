# The user-code image: this project's Dagster code location (ghcr.io/mlops-assets/user-code:0.1.0),
# served by `dagster code-server` and used for every run pod (K8sRunLauncher).
# Dependencies are installed at BUILD time, pinned by constraints.txt; nothing is installed when
# the container starts.
#   docker build -t ghcr.io/mlops-assets/user-code:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLOPS_ENV=kubernetes \
    MLOPS_HOME=/tmp/mlops \
    MLOPS_K8S_MANIFESTS=/opt/mlops-assets/k8s/overlays/prod \
    HOME=/tmp

WORKDIR /opt/mlops-assets

# Dependencies first (cache-friendly), then the package itself.
COPY pyproject.toml constraints.txt README.md ./
COPY mlops_assets ./mlops_assets
# The manifests the platform/* assets reconcile on the cluster (MLOPS_K8S_MANIFESTS).
COPY k8s ./k8s
# Editable, so the installed package stays beside this pyproject.toml: the code location loads its
# defs/ folder through `[tool.dg]` (load_from_defs_folder), in the code server and in run pods alike.
RUN pip install -c constraints.txt -e . \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp dagster

USER 10001:10001

EXPOSE 3030
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "3030", "-m", "mlops_assets.definitions"]

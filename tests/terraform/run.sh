#!/usr/bin/env bash
# Terraform checks: fmt, init (local provider mirror), validate, and a real `terraform apply` then
# `destroy` against a local AWS API emulator (moto, bound to 127.0.0.1, bounded in time).
# Prints each step and a final "N passed, N failed".
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tfdir=$(cd "$here/../../terraform" && pwd)
PLUGINS=${TF_PLUGIN_DIR:-/opt/tf-plugins}
work=$(mktemp -d /tmp/ztna-tf.XXXXXX)
export TF_DATA_DIR="$work/data" TF_IN_AUTOMATION=1 TF_CLI_CONFIG_FILE=/dev/null CHECKPOINT_DISABLE=1
passed=0 failed=0 moto_pid=""
ok() { echo "PASS $1${2:+: $2}"; passed=$((passed + 1)); }
bad() { echo "FAIL $1${2:+: $2}"; failed=$((failed + 1)); }
cleanup() { [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

command -v terraform >/dev/null || { echo "SKIP terraform: not installed"; exit 0; }
[ -d "$PLUGINS" ] || { echo "SKIP terraform: no provider mirror at $PLUGINS"; exit 0; }

terraform -chdir="$tfdir" fmt -check -recursive >/dev/null && ok "terraform fmt -check" || bad "terraform fmt -check" "$(terraform -chdir="$tfdir" fmt -check -recursive)"
# Work on a copy so init writes nothing into the repository.
cp "$tfdir"/*.tf "$work/"
if terraform -chdir="$work" init -backend=false -plugin-dir="$PLUGINS" -input=false >"$work/init.log" 2>&1; then
  ok "terraform init -backend=false -plugin-dir=$PLUGINS"
else
  bad "terraform init" "$(tail -5 "$work/init.log")"; echo "terraform: $passed passed, $failed failed"; exit 1
fi
terraform -chdir="$work" validate -no-color >"$work/validate.log" 2>&1 && ok "terraform validate" || bad "terraform validate" "$(cat "$work/validate.log")"

# --- apply and destroy against moto ---------------------------------------------------------------
if ! python3 -c "import moto.server" 2>/dev/null; then
  pip install -q "moto[server]" >"$work/pip.log" 2>&1 || { echo "SKIP apply/destroy: cannot install moto[server]"; echo "terraform: $passed passed, $failed failed"; [ "$failed" -eq 0 ]; exit; }
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m moto.server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto_pid=$!
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=eu-central-1 AWS_EC2_METADATA_DISABLED=true
for _ in $(seq 100); do python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/')" 2>/dev/null && break; sleep 0.1; done
# The emulator has no NixOS images: register a stand-in AMI and pass it as ami_id.
ami=$(python3 - "$port" <<'PY'
import sys, boto3
ec2 = boto3.client("ec2", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="eu-central-1")
base = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
print(base)
PY
)
key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6w9m4mKq3pP6CgwJ3J1m7z5Zc3VQqYkqQe7Jt9d0Xj ci@ztna"
vars=(-var "endpoint_override=http://127.0.0.1:$port" -var "ami_id=$ami" -var "admin_cidrs=[\"198.51.100.0/24\"]"
      -var "monitoring_cidrs=[\"198.51.100.10/32\"]" -var "ssh_public_key=$key" -var "connector_count=1" -var "region=eu-central-1")
if timeout 600 terraform -chdir="$work" apply -auto-approve -input=false -no-color -state="$work/state" "${vars[@]}" >"$work/apply.log" 2>&1; then
  resources=$(terraform -chdir="$work" state list -state="$work/state" | sort)
  count=$(echo "$resources" | grep -c .)
  outputs=$(terraform -chdir="$work" output -state="$work/state" -json intermediates)
  echo "$resources" | sed 's/^/  created: /'
  echo "  output intermediates = $outputs"
  want="aws_eip.intermediate[\"blue\"] aws_eip.intermediate[\"green\"] aws_instance.connector[0] aws_instance.intermediate[\"blue\"] aws_instance.intermediate[\"green\"] aws_security_group.intermediate aws_security_group.connector aws_iam_role.node aws_iam_instance_profile.node aws_key_pair.deploy aws_vpc.this[0] aws_subnet.public[0] aws_internet_gateway.this[0] aws_route_table.public[0]"
  missing=""
  for r in $want; do echo "$resources" | grep -qxF "$r" || missing="$missing $r"; done
  # What the emulator recorded: IMDSv2 required and encrypted gp3 roots on every instance.
  checks=$(python3 - "$port" <<'PY'
import sys, boto3
ec2 = boto3.client("ec2", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="eu-central-1")
bad = []
for r in ec2.describe_instances()["Reservations"]:
    for i in r["Instances"]:
        name = {t["Key"]: t["Value"] for t in i.get("Tags", [])}.get("Name", i["InstanceId"])
        if i.get("MetadataOptions", {}).get("HttpTokens") != "required":
            bad.append(f"{name}: IMDSv2 not required")
        for m in i.get("BlockDeviceMappings", []):
            v = ec2.describe_volumes(VolumeIds=[m["Ebs"]["VolumeId"]])["Volumes"][0]
            if not v.get("Encrypted") or v.get("VolumeType") != "gp3":
                bad.append(f"{name}: root volume {v.get('VolumeType')} encrypted={v.get('Encrypted')}")
sg = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["ztna-intermediate"]}])["SecurityGroups"][0]
udp = [p for p in sg["IpPermissions"] if p.get("IpProtocol") == "udp" and p.get("FromPort") == 4433]
if not udp:
    bad.append("intermediate SG lacks UDP 4433")
print("; ".join(bad) or "ok")
PY
)
  if [ -z "$missing" ] && [ "$checks" = ok ]; then
    ok "terraform apply against moto" "$count resources, IMDSv2 required, gp3 encrypted roots, UDP 4433 open"
  else
    bad "terraform apply against moto" "missing:$missing; checks: $checks"
  fi
  # deploy_hosts becomes deploy/hosts.json (deploy.yml): each host with its address and Nix system,
  # the same shape as deploy/hosts.example.json, which the flake evaluation (tests/nix) reads.
  hosts=$(terraform -chdir="$work" output -state="$work/state" -json deploy_hosts)
  arm=$(echo 'local.nix_system[local.intermediate_arch]' | terraform -chdir="$work" console -state="$work/state" "${vars[@]}" -var intermediate_instance_type=t4g.small 2>&1 | tail -1)
  if out=$(python3 - "$hosts" "$arm" "$tfdir/../deploy/hosts.example.json" <<'PY'
import json, sys
hosts, arm, example = json.loads(sys.argv[1]), sys.argv[2].strip('"'), json.load(open(sys.argv[3]))
assert set(hosts) == set(example), f"keys {sorted(hosts)} != {sorted(example)}"
for name, h in hosts.items():
    assert set(h) == {"hostname", "system"}, f"{name}: {h}"
    assert h["system"] == "x86_64-linux", f"{name} on t3.small: {h['system']}"
    assert h["hostname"].count(".") == 3, f"{name}: {h['hostname']}"
assert arm == "aarch64-linux", f"t4g.small intermediates: {arm}"
listed = ", ".join("%s %s %s" % (n, h["hostname"], h["system"]) for n, h in sorted(hosts.items()))
print(f"{listed}; t4g.small intermediates -> {arm}")
PY
  ); then ok "output deploy_hosts (per-host Nix system)" "$out"; else bad "output deploy_hosts" "$out $hosts $arm"; fi
  if timeout 600 terraform -chdir="$work" destroy -auto-approve -input=false -no-color -state="$work/state" "${vars[@]}" >"$work/destroy.log" 2>&1 \
     && [ -z "$(terraform -chdir="$work" state list -state="$work/state")" ]; then
    ok "terraform destroy against moto" "state empty"
  else
    bad "terraform destroy against moto" "$(tail -15 "$work/destroy.log")"
  fi
else
  bad "terraform apply against moto" "$(grep -A5 -i error "$work/apply.log" | head -30)"
fi
echo "terraform: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

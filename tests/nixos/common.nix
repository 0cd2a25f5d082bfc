# Shared pieces of the nixosTests: a test PKI made with ztna-pki when the test runs, keys placed
# outside the store, the echo backend, and the ZTNA modules with the flake's packages.
{ self, pkgs }:
let
  ztna-pki = self.packages.${pkgs.stdenv.hostPlatform.system}.ztna-pki;
in
{
  # The daemons wait for their keys (copied in by the test script) instead of starting at boot.
  waitForKeys = role: {
    systemd.services."ztna-${role}".unitConfig.ConditionPathExists = "/run/keys/ztna/key.pem";
  };

  # Test script prelude: the PKI is made now, by the driver, with certificates valid from this
  # run on. (Made at build time it would be a cached derivation whose certificates expire a year
  # later, failing every later run of the same test.) start_with_keys copies a node's keys to
  # /run/keys/ztna (the modules refuse key files in the store) and starts its daemon.
  pkiScript = ''
    import os, subprocess, tempfile
    pki = tempfile.mkdtemp(prefix="ztna-pki-")
    def ztna_pki(*args):
        subprocess.run(["${ztna-pki}/bin/ztna-pki", *args], check=True)
    ztna_pki("init", "--out", pki, "--trust-domain", "test.ztna")
    ztna_pki("issue", "--ca", pki, "--role", "intermediate", "--name", "relay-a", "--ip", "192.168.1.10", "--ip", "192.168.2.10", "--out", pki)
    ztna_pki("issue", "--ca", pki, "--role", "intermediate", "--name", "relay-b", "--ip", "192.168.1.11", "--ip", "192.168.2.11", "--out", pki)
    ztna_pki("issue", "--ca", pki, "--role", "connector", "--name", "web-1", "--out", pki)
    ztna_pki("issue", "--ca", pki, "--role", "agent", "--name", "alice", "--out", pki)

    def start_with_keys(machine, name, role):
        machine.succeed("install -d -m 0700 /run/keys/ztna")
        for src, dst in [("ca.pem", "ca.pem"), (f"{name}.pem", "cert.pem"), (f"{name}.key", "key.pem")]:
            machine.copy_from_host(os.path.join(pki, src), f"/run/keys/ztna/{dst}")
        machine.succeed("chmod 0600 /run/keys/ztna/*")
        machine.systemctl(f"start ztna-{role}.service")
        machine.wait_for_unit(f"ztna-{role}.service")
  '';

  secrets = {
    caFile = "/run/keys/ztna/ca.pem";
    certFile = "/run/keys/ztna/cert.pem";
    keyFile = "/run/keys/ztna/key.pem";
  };

  policy = [
    {
      service = "web";
      connectors = [ "spiffe://test.ztna/connector/*" ];
      agents = [ "spiffe://test.ztna/agent/*" ];
    }
  ];

  # TCP echo on 7000 and UDP echo on 7001.
  echoBackend = {
    networking.firewall.enable = false;
    systemd.services.echo-tcp = {
      wantedBy = [ "multi-user.target" ];
      serviceConfig.ExecStart = "${pkgs.socat}/bin/socat TCP-LISTEN:7000,fork,reuseaddr EXEC:${pkgs.coreutils}/bin/cat";
    };
    systemd.services.echo-udp = {
      wantedBy = [ "multi-user.target" ];
      serviceConfig.ExecStart = "${pkgs.socat}/bin/socat UDP-RECVFROM:7001,fork EXEC:${pkgs.coreutils}/bin/cat";
    };
  };

  addr = iface: ip: {
    networking.interfaces.${iface}.ipv4.addresses = [
      {
        address = ip;
        prefixLength = 24;
      }
    ];
  };
}

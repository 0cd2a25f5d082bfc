# Shared pieces of the nixosTests: a test PKI made with ztna-pki, keys placed outside the store,
# the echo backend, and the ZTNA modules with the flake's packages.
{ self, pkgs }:
let
  pki = pkgs.runCommand "ztna-test-pki" { nativeBuildInputs = [ self.packages.${pkgs.stdenv.hostPlatform.system}.ztna-pki ]; } ''
    ztna-pki init --out $out --trust-domain test.ztna
    ztna-pki issue --ca $out --role intermediate --name relay-a --ip 192.168.1.10 --ip 192.168.2.10 --out $out
    ztna-pki issue --ca $out --role intermediate --name relay-b --ip 192.168.1.11 --ip 192.168.2.11 --out $out
    ztna-pki issue --ca $out --role connector --name web-1 --out $out
    ztna-pki issue --ca $out --role agent --name alice --out $out
  '';
in
{
  inherit pki;

  # Keys are copied to /run/keys at boot: the modules refuse key files inside the Nix store.
  keysFor = name: {
    system.activationScripts.ztna-test-keys = ''
      install -D -m 0600 ${pki}/ca.pem /run/keys/ztna/ca.pem
      install -D -m 0600 ${pki}/${name}.pem /run/keys/ztna/cert.pem
      install -D -m 0600 ${pki}/${name}.key /run/keys/ztna/key.pem
    '';
  };

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

# Rolling restart of two intermediates under continuous new flows: zero failed flows, and the
# connector back on 2/2 after each step (case 4 of the namespace suite).
{ self }:
{ pkgs, ... }:
let
  c = import ./common.nix { inherit self pkgs; };
  relay = name: ip1: ip2: {
    imports = [
      self.nixosModules.intermediate
      (c.keysFor name)
      (c.addr "eth1" ip1)
      (c.addr "eth2" ip2)
    ];
    virtualisation.vlans = [ 1 2 ];
    services.ztna.intermediate = c.secrets // {
      enable = true;
      openFirewall = true;
      drainTimeout = 10;
      settings.policy = c.policy;
    };
  };
in
{
  name = "ztna-rolling";

  nodes = {
    relaya = relay "relay-a" "192.168.1.10" "192.168.2.10";
    relayb = relay "relay-b" "192.168.1.11" "192.168.2.11";
    connector = {
      imports = [
        self.nixosModules.connector
        c.echoBackend
        (c.keysFor "web-1")
        (c.addr "eth1" "192.168.2.20")
      ];
      virtualisation.vlans = [ 2 ];
      environment.systemPackages = [ pkgs.curl ];
      services.ztna.connector = c.secrets // {
        enable = true;
        settings = {
          intermediates = [ "192.168.2.10:4433" "192.168.2.11:4433" ];
          service = [{ name = "web"; tcp = "127.0.0.1:7000"; }];
        };
      };
    };
    agent = {
      imports = [
        self.nixosModules.agent
        (c.keysFor "alice")
        (c.addr "eth1" "192.168.1.1")
      ];
      virtualisation.vlans = [ 1 ];
      environment.systemPackages = [ pkgs.socat pkgs.curl ];
      services.ztna.agent = c.secrets // {
        enable = true;
        settings = {
          intermediates = [ "192.168.1.10:4433" "192.168.1.11:4433" ];
          forward = [{ service = "web"; listen = "127.0.0.1:8080"; }];
        };
      };
    };
  };

  testScript = ''
    start_all()
    connector.wait_until_succeeds(
        "curl -s http://127.0.0.1:9091/metrics | grep -q '^ztna_connector_intermediates_connected 2'"
    )
    agent.wait_until_succeeds("echo up | timeout 5 socat - TCP:127.0.0.1:8080 | grep up")

    # Continuous new flows, each must echo; failures are counted.
    agent.succeed(
        "(ok=0; bad=0; while [ ! -f /tmp/stop ]; do "
        "if echo ping | timeout 10 socat - TCP:127.0.0.1:8080 | grep -q ping; then ok=$((ok+1)); else bad=$((bad+1)); fi; "
        "sleep 0.05; done; echo \"$ok $bad\" > /tmp/load) >/dev/null 2>&1 &"
    )

    for relay in [relaya, relayb]:
        with subtest(f"drain and restart {relay.name} under load"):
            relay.systemctl("restart ztna-intermediate.service")
            relay.wait_for_unit("ztna-intermediate.service")
            connector.wait_until_succeeds(
                "curl -s http://127.0.0.1:9091/metrics | grep -q '^ztna_connector_intermediates_connected 2'"
            )

    agent.succeed("touch /tmp/stop")
    agent.wait_for_file("/tmp/load")
    ok, bad = map(int, agent.succeed("cat /tmp/load").split())
    print(f"rolling restart: {ok + bad} flows attempted, {bad} failed")
    assert ok > 20, ok
    assert bad == 0, f"{bad} flows failed"
  '';
}

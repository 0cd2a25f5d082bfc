# Rolling restart of two intermediates under continuous new flows: zero failed flows, and the
# connector back on 2/2 after each step (case 4 of the namespace suite).
{ self }:
{ pkgs, ... }:
let
  c = import ./common.nix { inherit self pkgs; };
  relay = ip1: ip2: {
    imports = [
      self.nixosModules.intermediate
      (c.waitForKeys "intermediate")
      (c.addr "eth1" ip1)
      (c.addr "eth2" ip2)
    ];
    virtualisation.vlans = [ 1 2 ];
    environment.systemPackages = [ pkgs.curl ];
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
    relaya = relay "192.168.1.10" "192.168.2.10";
    relayb = relay "192.168.1.11" "192.168.2.11";
    connector = {
      imports = [
        self.nixosModules.connector
        c.echoBackend
        (c.waitForKeys "connector")
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
        (c.waitForKeys "agent")
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

  testScript = c.pkiScript + ''
    start_all()
    start_with_keys(relaya, "relay-a", "intermediate")
    start_with_keys(relayb, "relay-b", "intermediate")
    start_with_keys(connector, "web-1", "connector")
    start_with_keys(agent, "alice", "agent")
    # Each relay's own view: the connector is registered there for "web".
    registered = "curl -s --max-time 2 http://127.0.0.1:9470/metrics | grep -q '^ztna_intermediate_service_connectors{service=\"web\"} 1'"
    relaya.wait_until_succeeds(registered)
    relayb.wait_until_succeeds(registered)
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
            # The restarted process's own metric: the connector has registered with it again
            # (the connector's "connected 2" gauge could still show the old connection).
            relay.wait_until_succeeds(registered)

    agent.succeed("touch /tmp/stop")
    agent.wait_for_file("/tmp/load")
    ok, bad = map(int, agent.succeed("cat /tmp/load").split())
    print(f"rolling restart: {ok + bad} flows attempted, {bad} failed")
    assert ok > 20, ok
    assert bad == 0, f"{bad} flows failed"
  '';
}

# Direct (P2P) path through two NAT routers: the relay on the shared "internet" (vlan 1), the
# agent behind router nata (vlan 2), the connector behind router natc (vlan 3), the backend on
# vlan 4 where only the connector reaches it. Both routers masquerade (networking.nat) and keep
# the NixOS firewall on, as home routers do: unsolicited packets to a router are dropped, so they
# leave no conntrack entry that would make its next mapping towards that peer take another port
# (tests/system/p2p.py has the bare-MASQUERADE cases). Asserts that a flow through the agent goes
# direct (ztna_agent_flows_total{path="direct"} moves, ztna_agent_direct_paths is 1) and that its
# 8 MiB come back intact without a byte through the relay.
{ self }:
{ pkgs, ... }:
let
  c = import ./common.nix { inherit self pkgs; };
  relayAddr = "192.168.1.10";
  router = wan: lan: {
    imports = [
      (c.addr "eth1" wan)
      (c.addr "eth2" lan)
    ];
    networking.nat = {
      enable = true;
      internalInterfaces = [ "eth2" ];
      externalInterface = "eth1";
    };
  };
in
{
  name = "ztna-p2p";

  nodes = {
    relay = {
      imports = [
        self.nixosModules.intermediate
        (c.waitForKeys "intermediate")
        (c.addr "eth1" relayAddr)
      ];
      virtualisation.vlans = [ 1 ];
      environment.systemPackages = [ pkgs.curl ];
      services.ztna.intermediate = c.secrets // {
        enable = true;
        openFirewall = true;
        settings.policy = c.policy;
      };
    };

    nata = {
      imports = [ (router "192.168.1.11" "192.168.2.254") ];
      virtualisation.vlans = [ 1 2 ];
    };

    natc = {
      imports = [ (router "192.168.1.12" "192.168.3.254") ];
      virtualisation.vlans = [ 1 3 ];
    };

    agent = {
      imports = [
        self.nixosModules.agent
        (c.waitForKeys "agent")
        (c.addr "eth1" "192.168.2.20")
      ];
      virtualisation.vlans = [ 2 ];
      networking.defaultGateway = "192.168.2.254";
      environment.systemPackages = [ pkgs.socat pkgs.curl pkgs.python3 ];
      services.ztna.agent = c.secrets // {
        enable = true;
        settings = {
          intermediates = [ "${relayAddr}:4433" ];
          forward = [
            { service = "web"; protocol = "tcp"; listen = "127.0.0.1:8080"; }
            { service = "web"; protocol = "udp"; listen = "127.0.0.1:8081"; }
          ];
        };
      };
    };

    connector = {
      imports = [
        self.nixosModules.connector
        (c.waitForKeys "connector")
        (c.addr "eth1" "192.168.3.20")
        (c.addr "eth2" "192.168.4.20")
      ];
      virtualisation.vlans = [ 3 4 ];
      networking.defaultGateway = "192.168.3.254";
      environment.systemPackages = [ pkgs.socat pkgs.curl ];
      services.ztna.connector = c.secrets // {
        enable = true;
        settings = {
          intermediates = [ "${relayAddr}:4433" ];
          service = [{ name = "web"; tcp = "192.168.4.30:7000"; udp = "192.168.4.30:7001"; }];
        };
      };
    };

    backend = {
      imports = [
        c.echoBackend
        (c.addr "eth1" "192.168.4.30")
      ];
      virtualisation.vlans = [ 4 ];
    };
  };

  testScript = c.pkiScript + ''
    start_all()
    backend.wait_for_unit("echo-tcp.service")
    backend.wait_for_unit("echo-udp.service")
    for r in [nata, natc]:
        r.wait_for_unit("firewall.service")
    start_with_keys(relay, "relay-a", "intermediate")
    start_with_keys(connector, "web-1", "connector")
    start_with_keys(agent, "alice", "agent")
    connector.wait_until_succeeds("curl -sf --max-time 2 http://127.0.0.1:9471/readyz")
    agent.wait_until_succeeds("curl -sf --max-time 2 http://127.0.0.1:9472/readyz")

    def metric(machine, port, pattern):
        """Sum of the samples whose line matches the awk pattern."""
        return float(machine.succeed(
            f"curl -s --max-time 2 http://127.0.0.1:{port}/metrics | awk '/{pattern}/ {{s += $2}} END {{print s + 0}}'"))

    direct_flows = lambda: metric(agent, 9472, '^ztna_agent_flows_total.*path="direct".*result="ok"')
    relay_flows = lambda: metric(agent, 9472, '^ztna_agent_flows_total.*path="relay".*result="ok"')
    relay_bytes = lambda: metric(relay, 9470, "^ztna_intermediate_relay_bytes_total")

    with subtest("topology: both behind their NATs, only the connector reaches the backend"):
        agent.fail("timeout 3 socat -T2 - TCP:192.168.4.30:7000 </dev/null")
        connector.succeed("echo direct | timeout 5 socat - TCP:192.168.4.30:7000 | grep direct")
        # The relay sees the routers' internet addresses (vlan 1), not the hosts' own.
        for role in ["agent", "connector"]:
            relay.wait_until_succeeds(
                f"journalctl -u ztna-intermediate | grep '{role} connected' | grep -E 'addr=192[.]168[.]1[.]'", timeout=30)
            relay.fail(f"journalctl -u ztna-intermediate | grep '{role} connected' | grep -E 'addr=192[.]168[.][234][.]'")

    with subtest("the first flow brokers a direct path (it goes via the relay meanwhile)"):
        agent.succeed("echo first | timeout 10 socat - TCP:127.0.0.1:8080 | grep first")
        # A path is asked for when a flow opens: keep opening flows, so an attempt that failed is
        # retried once its backoff has passed.
        agent.wait_until_succeeds(
            "echo again | timeout 10 socat - TCP:127.0.0.1:8080 | grep -q again && "
            "curl -s --max-time 2 http://127.0.0.1:9472/metrics | grep -qx 'ztna_agent_direct_paths 1'", timeout=60)
        connector.wait_until_succeeds(
            "curl -s --max-time 2 http://127.0.0.1:9471/metrics | grep -qx 'ztna_connector_direct_connections 1'", timeout=10)
        success = metric(relay, 9470, '^ztna_intermediate_p2p_total.*result="success"')
        print(f"direct path up; relay p2p_total success {success}; agent log: "
              + agent.succeed("journalctl -u ztna-agent | grep 'direct path up' | tail -1"))
        assert success >= 1, success

    with subtest("8 MiB over TCP and a UDP flow go direct; the relay carries none of their bytes"):
        d0, r0, b0 = direct_flows(), relay_flows(), relay_bytes()
        print(agent.succeed("python3 ${./transfer.py} 8080 8"))
        agent.succeed("echo dgram | timeout 5 socat -t2 - UDP:127.0.0.1:8081 | grep dgram")
        d1, r1, b1 = direct_flows(), relay_flows(), relay_bytes()
        print(f"agent flows direct {d0:.0f} -> {d1:.0f}, relay {r0:.0f} -> {r1:.0f}; relay bytes {b0:.0f} -> {b1:.0f}")
        assert d1 - d0 == 2 and r1 == r0, "the flows did not go direct"
        assert b1 == b0, "bytes went through the relay"
        agent.succeed("curl -s --max-time 2 http://127.0.0.1:9472/metrics | grep -qx 'ztna_agent_direct_paths 1'")
  '';
}

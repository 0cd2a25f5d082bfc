# End to end on four VMs: agent and intermediate share vlan 1, intermediate and connector vlan 2,
# connector and backend vlan 3, so only the connector can reach the backend. Each step matches a
# case of the namespace suite (tests/system/run.sh).
{ self }:
{ pkgs, ... }:
let
  c = import ./common.nix { inherit self pkgs; };
in
{
  name = "ztna-e2e";

  nodes = {
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
          intermediates = [ "192.168.1.10:4433" ];
          forward = [
            { service = "web"; protocol = "tcp"; listen = "127.0.0.1:8080"; }
            { service = "web"; protocol = "udp"; listen = "127.0.0.1:8081"; }
          ];
        };
      };
    };

    intermediate = {
      imports = [
        self.nixosModules.intermediate
        (c.keysFor "relay-a")
        (c.addr "eth1" "192.168.1.10")
        (c.addr "eth2" "192.168.2.10")
      ];
      virtualisation.vlans = [ 1 2 ];
      environment.systemPackages = [ pkgs.curl ];
      services.ztna.intermediate = c.secrets // {
        enable = true;
        openFirewall = true;
        settings.policy = c.policy;
      };
    };

    connector = {
      imports = [
        self.nixosModules.connector
        (c.keysFor "web-1")
        (c.addr "eth1" "192.168.2.20")
        (c.addr "eth2" "192.168.3.20")
      ];
      virtualisation.vlans = [ 2 3 ];
      environment.systemPackages = [ pkgs.socat pkgs.iproute2 pkgs.curl ];
      services.ztna.connector = c.secrets // {
        enable = true;
        settings = {
          intermediates = [ "192.168.2.10:4433" ];
          service = [{ name = "web"; tcp = "192.168.3.30:7000"; udp = "192.168.3.30:7001"; }];
        };
      };
    };

    backend = {
      imports = [
        c.echoBackend
        (c.addr "eth1" "192.168.3.30")
      ];
      virtualisation.vlans = [ 3 ];
    };
  };

  testScript = ''
    start_all()
    backend.wait_for_unit("echo-tcp.service")
    backend.wait_for_unit("echo-udp.service")
    intermediate.wait_for_unit("ztna-intermediate.service")
    connector.wait_for_unit("ztna-connector.service")
    agent.wait_for_unit("ztna-agent.service")
    connector.wait_until_succeeds("curl -sf http://127.0.0.1:9091/readyz")
    agent.wait_until_succeeds("curl -sf http://127.0.0.1:9092/readyz")

    with subtest("routing: the agent cannot reach the backend, the connector can"):
        agent.fail("timeout 3 socat -T2 - TCP:192.168.3.30:7000 </dev/null")
        connector.succeed("echo direct | timeout 5 socat - TCP:192.168.3.30:7000 | grep direct")

    with subtest("case 1: TCP and UDP through the agent's local ports"):
        agent.wait_until_succeeds("echo hello | timeout 5 socat - TCP:127.0.0.1:8080 | grep hello")
        agent.wait_until_succeeds("echo dgram | timeout 5 socat -t2 - UDP:127.0.0.1:8081 | grep dgram")

    with subtest("case 2: injection rejection at the connector"):
        # The connector's backend-facing UDP sockets (connected to the backend's 7001).
        ports = connector.succeed(
            "ss -Hun state established dst 192.168.3.30:7001 | awk '{print $3}' | sed 's/.*://' | sort -u"
        ).split()
        assert ports, "no backend-facing UDP socket found"
        for p in ports:
            connector.succeed(f"for i in $(seq 200); do echo INJECT | socat -u - UDP:192.168.3.20:{p}; done")
            connector.succeed(f"for i in $(seq 200); do echo INJECT | socat -u - UDP:127.0.0.1:{p}; done")
        out = agent.succeed("for i in $(seq 20); do echo legit-$i | timeout 3 socat -t1 - UDP:127.0.0.1:8081; done")
        assert "INJECT" not in out, out
        assert "legit-20" in out, out

    with subtest("hardening: systemd-analyze security exposure <= 1.5"):
        for m, unit in [(intermediate, "ztna-intermediate"), (connector, "ztna-connector"), (agent, "ztna-agent")]:
            line = m.succeed(f"systemd-analyze security {unit}.service --no-pager | tail -1")
            exposure = float(line.split(":")[1].split()[0])
            print(f"{unit}: exposure {exposure}")
            assert exposure <= 1.5, line

    with subtest("connector stopped: the agent reports the service unavailable and refuses at once"):
        connector.systemctl("stop ztna-connector.service")
        agent.wait_until_succeeds(
            "curl -s http://127.0.0.1:9092/metrics | grep -q 'ztna_agent_service_available{service=\"web\"} 0'"
        )
        agent.fail("echo refused | timeout 2 socat - TCP:127.0.0.1:8080 | grep refused")
        connector.systemctl("start ztna-connector.service")
        agent.wait_until_succeeds("echo again | timeout 5 socat - TCP:127.0.0.1:8080 | grep again")

    with subtest("metrics are served and move"):
        intermediate.succeed(
            "curl -sf http://127.0.0.1:9090/metrics | grep -E 'ztna_intermediate_flows_total\\{protocol=\"tcp\",result=\"ok\"\\} [1-9]'"
        )
  '';
}

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
        (c.waitForKeys "agent")
        (c.addr "eth1" "192.168.1.1")
      ];
      virtualisation.vlans = [ 1 ];
      environment.systemPackages = [ pkgs.socat pkgs.curl pkgs.python3 ];
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
        (c.waitForKeys "intermediate")
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
        (c.waitForKeys "connector")
        (c.addr "eth1" "192.168.2.20")
        (c.addr "eth2" "192.168.3.20")
      ];
      virtualisation.vlans = [ 2 3 ];
      # The connector has no inbound port; without the host firewall the injection case below
      # exercises the connector's own sockets, not conntrack.
      networking.firewall.enable = false;
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
      environment.systemPackages = [ pkgs.python3 ];
    };
  };

  testScript = c.pkiScript + ''
    start_all()
    backend.wait_for_unit("echo-tcp.service")
    backend.wait_for_unit("echo-udp.service")
    start_with_keys(intermediate, "relay-a", "intermediate")
    start_with_keys(connector, "web-1", "connector")
    start_with_keys(agent, "alice", "agent")
    connector.wait_until_succeeds("curl -sf --max-time 2 http://127.0.0.1:9471/readyz")
    agent.wait_until_succeeds("curl -sf --max-time 2 http://127.0.0.1:9472/readyz")

    with subtest("routing: the agent cannot reach the backend, the connector can"):
        agent.fail("timeout 3 socat -T2 - TCP:192.168.3.30:7000 </dev/null")
        connector.succeed("echo direct | timeout 5 socat - TCP:192.168.3.30:7000 | grep direct")

    with subtest("case 1: TCP and UDP through the agent's local ports"):
        agent.wait_until_succeeds("echo hello | timeout 5 socat - TCP:127.0.0.1:8080 | grep hello")
        agent.wait_until_succeeds("echo dgram | timeout 5 socat -t2 - UDP:127.0.0.1:8081 | grep dgram")

    with subtest("case 2: forged datagrams at the connector's socket of a live UDP flow"):
        # A client keeps one UDP flow open through the agent and records all it receives.
        agent.succeed("mkdir -p /tmp/live && (python3 ${./udp.py} hold 127.0.0.1 8081 /tmp/live >/tmp/live/log 2>&1 &)")
        agent.wait_until_succeeds("grep -x ready /tmp/live/ready")
        # The connector's backend-facing sockets (connected to 192.168.3.30:7001), the live flow's among them.
        ports = ",".join(connector.succeed(
            "ss -Hun state established dst 192.168.3.30:7001 | awk '{print $3}' | sed 's/.*://' | sort -u"
        ).split())
        assert ports, "no backend-facing UDP socket found"
        rejected = lambda: float(connector.succeed(
            "curl -s --max-time 2 http://127.0.0.1:9471/metrics | awk '/^ztna_connector_udp_rejected_total/ {s += $2} END {print s + 0}'"))
        noports = lambda: int(connector.succeed("nstat -az UdpNoPorts | awk '/UdpNoPorts/ {print $2}'"))
        rejected0, noports0 = rejected(), noports()
        # From the backend's network, with forged sources: the backend's address with another
        # port, and the backend's port from another address (raw socket, 200 each per socket).
        backend.succeed(f"python3 ${./udp.py} inject 192.168.3.30 7002 192.168.3.20 {ports} INJECT-PORT 200")
        backend.succeed(f"python3 ${./udp.py} inject 192.168.3.99 7001 192.168.3.20 {ports} INJECT-ADDR 200")
        # Control: a perfect forgery (the backend's address and port) is indistinguishable from
        # the backend and does reach the client, so the client would see any injected datagram
        # the connector let through.
        backend.succeed(f"python3 ${./udp.py} inject 192.168.3.30 7001 192.168.3.20 {ports} CONTROL 3")
        agent.wait_until_succeeds("grep -q CONTROL /tmp/live/received", timeout=30)
        agent.succeed("sleep 2; touch /tmp/live/stop")
        received = agent.succeed("cat /tmp/live/received")
        n = len(ports.split(","))
        dropped = noports() - noports0
        print(f"live flow received: {received!r}; sockets {ports}; kernel UdpNoPorts +{dropped}; "
              f"ztna_connector_udp_rejected_total {rejected0} -> {rejected()}")
        assert "INJECT" not in received, received
        # The connected sockets make the kernel drop every forged datagram before the connector
        # reads it (counted as UdpNoPorts); none reaches the connector's own source check
        # (ztna_connector_udp_rejected_total), the second line of defence.
        assert dropped >= 400 * n, f"kernel dropped {dropped} of {400 * n} forged datagrams"
        assert rejected() == rejected0

    with subtest("hardening: systemd-analyze security exposure <= 1.5"):
        for m, unit in [(intermediate, "ztna-intermediate"), (connector, "ztna-connector"), (agent, "ztna-agent")]:
            line = m.succeed(f"systemd-analyze security {unit}.service --no-pager | tail -1")
            exposure = float(line.split(":")[1].split()[0])
            print(f"{unit}: exposure {exposure}")
            assert exposure <= 1.5, line

    with subtest("connector stopped: the agent reports the service unavailable and refuses at once"):
        connector.systemctl("stop ztna-connector.service")
        agent.wait_until_succeeds(
            "curl -s --max-time 2 http://127.0.0.1:9472/metrics | grep -q 'ztna_agent_service_available{service=\"web\"} 0'"
        )
        agent.fail("echo refused | timeout 2 socat - TCP:127.0.0.1:8080 | grep refused")
        connector.systemctl("start ztna-connector.service")
        agent.wait_until_succeeds("echo again | timeout 5 socat - TCP:127.0.0.1:8080 | grep again")

    with subtest("metrics are served and move"):
        intermediate.succeed(
            "curl -sf --max-time 2 http://127.0.0.1:9470/metrics | grep -E 'ztna_intermediate_flows_total\\{protocol=\"tcp\",result=\"ok\"\\} [1-9]'"
        )
  '';
}

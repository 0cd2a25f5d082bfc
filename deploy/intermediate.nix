# An intermediate of the blue/green pair. `colour` picks its name; the other colour is its GoAway
# reconnect hint. Keys are provisioned out of band into /var/lib/ztna/keys (see docs/operations.md).
{ colour, hosts }:
{ ... }:
let
  other = if colour == "blue" then "green" else "blue";
in
{
  networking.hostName = "ztna-intermediate-${colour}";
  services.ztna.intermediate = {
    enable = true;
    openFirewall = true;
    caFile = "/var/lib/ztna/keys/ca.pem";
    certFile = "/var/lib/ztna/keys/intermediate.pem";
    keyFile = "/var/lib/ztna/keys/intermediate.key";
    drainTimeout = 30;
    settings = {
      listen = "0.0.0.0:4433";
      reconnect_hint = [ "${hosts.${other}.hostname}:4433" ];
      policy = [
        {
          service = "web";
          connectors = [ "spiffe://corp.example/connector/web-*" ];
          agents = [ "spiffe://corp.example/agent/*" ];
        }
      ];
    };
  };
}

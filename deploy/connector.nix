# The example connector: registers "web" (a backend on the same host) with both intermediates.
{ hosts }:
{ ... }:
{
  networking.hostName = "ztna-connector";
  services.ztna.connector = {
    enable = true;
    caFile = "/var/lib/ztna/keys/ca.pem";
    certFile = "/var/lib/ztna/keys/connector.pem";
    keyFile = "/var/lib/ztna/keys/connector.key";
    settings = {
      intermediates = [ "${hosts.blue.hostname}:4433" "${hosts.green.hostname}:4433" ];
      service = [{ name = "web"; tcp = "127.0.0.1:8080"; }];
    };
  };
}

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }
}

provider "aws" {
  region = var.region

  # Only for tests against a local AWS API emulator (tests/terraform); empty in real use.
  dynamic "endpoints" {
    for_each = var.endpoint_override == "" ? [] : [var.endpoint_override]
    content {
      ec2 = endpoints.value
      iam = endpoints.value
      sts = endpoints.value
    }
  }
  skip_credentials_validation = var.endpoint_override != ""
  skip_metadata_api_check     = var.endpoint_override != ""
  skip_requesting_account_id  = var.endpoint_override != ""
  skip_region_validation      = var.endpoint_override != ""

  default_tags {
    tags = merge({ project = "ztna", managed-by = "terraform" }, var.tags)
  }
}

"""NOTES.txt says how to reach the proxy and how to check HTTP/3."""

from __future__ import annotations

from ._chart import PROFILES, helm_notes


def test_daemonset_host_ports_notes_give_node_ips_and_ports(helm):
    notes = helm_notes(helm, PROFILES["examples/daemonset-edge-complete"])
    assert "kubectl get nodes -o wide -l node-role.kubernetes.io/edge=true" in notes
    assert "curl http://$NODE_IP:80/_gwhealthz" in notes
    assert "curl -k https://$NODE_IP:443/_gwhealthz" in notes
    assert "--http3-only" in notes and "HTTP/3 443/UDP" in notes
    assert "No proxy Service is created" in notes
    assert "ghcr.io/pmh-only/quic-proxy/quic-proxy-waf:v1.1.0" in notes


def test_custom_ports_notes_use_8080_and_8443(helm):
    notes = helm_notes(helm, PROFILES["examples/custom-ports"])
    assert "curl http://$NODE_IP:8080/_gwhealthz" in notes
    assert "curl -k --http3-only -sI https://$NODE_IP:8443/_gwhealthz" in notes
    assert 'Alt-Svc: h3=":8443"' in notes


def test_load_balancer_notes_name_the_service(helm):
    notes = helm_notes(helm, PROFILES["default"])
    assert "Service edge-quic-proxy-waf-proxy (LoadBalancer)" in notes
    assert "HTTP/3 443/UDP" in notes
    assert "curl -k --http3-only -sI https://$IP:443/_gwhealthz" in notes
    assert "NODE_IP" not in notes


def test_cluster_ip_notes_explain_port_forward_is_tcp_only(helm):
    notes = helm_notes(helm, PROFILES["examples/daemonset-no-hostports"])
    assert "kubectl port-forward -n edge-ns svc/edge-quic-proxy-waf-proxy 8080:80 8443:443" in notes
    assert "TCP only" in notes


def test_notes_warn_about_demo_backend_and_self_signed_certificate(helm):
    notes = helm_notes(helm)
    assert "set proxy.backend.host" in notes
    assert "self-signed" in notes
    assert "helm test edge -n edge-ns" in notes


def test_notes_name_the_images_and_what_to_check_when_they_cannot_be_pulled(helm):
    notes = helm_notes(helm, values={"global": {"registry": "reg.example/team", "tag": "t1"}})
    assert "Image:   reg.example/team/quic-proxy-waf:t1 (pull policy IfNotPresent)" in notes
    assert "WAF image: reg.example/team/quic-proxy-waf:t1" in notes
    assert "ImagePullBackOff" in notes and "kubectl describe pod -n edge-ns" in notes
    assert "kind load docker-image reg.example/team/quic-proxy-waf:t1" in notes
    assert "global.registry" in notes

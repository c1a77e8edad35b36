#!/usr/bin/env python3
# ruff: noqa
# type: ignore
# The product spec's own node agent (`node_agent.py` in ../shared/seed/000_0ff54d0767bb89aa.txt),
# as the spec prints it: only the indentation its page breaks scrambled is restored, and the two
# lines cut at the page's right edge are completed (`NVML_TEMPERATURE_GPU`, the heartbeat
# print). Mnemo must keep working with it unchanged (tests/agent/test_agent_gateway.py).
"""
Mnemo Node Agent
Runs on provider machines to report memory availability
"""

import os
import time
import json
import requests
import psutil
import platform
from datetime import datetime

# Try to import GPU monitoring (optional)
try:
    import pynvml

    pynvml.nvmlInit()
    GPU_AVAILABLE = True
except:
    GPU_AVAILABLE = False


class MnemoNodeAgent:
    def __init__(self, config_path='node_config.json'):
        """Initialize node agent with configuration"""
        with open(config_path, 'r') as f:
            self.config = json.load(f)

        self.api_url = self.config['api_url']
        self.api_key = self.config['api_key']
        self.node_id = self.config.get('node_id')
        self.heartbeat_interval = self.config.get('heartbeat_interval', 60)

        # Register node if not already registered
        if not self.node_id:
            self.register_node()

    def register_node(self):
        """Register this machine as a node"""
        print("Registering node with Mnemo platform...")

        # Detect system info
        ram_info = psutil.virtual_memory()

        payload = {
            "node_type": self.config['node_type'],
            "name": self.config['name'],
            "region": self.config['region'],
            "latitude": self.config.get('latitude'),
            "longitude": self.config.get('longitude'),
            "total_ram_gb": int(ram_info.total / (1024**3)),
            "total_vram_gb": self.get_total_vram(),
            "bandwidth_mbps": self.config.get('bandwidth_mbps', 1000),
            "base_latency_ms": self.config.get('base_latency_ms', 1.0),
            "price_per_gb_sec": self.config['price_per_gb_sec'],
            "metadata": {
                "os": platform.system(),
                "cpu": platform.processor(),
                "gpu_model": self.get_gpu_model(),
                "idle_schedule": self.config.get('idle_schedule', 'always')
            }
        }

        response = requests.post(
            f"{self.api_url}/api/nodes/register",
            headers={"X-API-Key": self.api_key},
            json=payload
        )

        if response.status_code == 200:
            data = response.json()
            self.node_id = data['node_id']

            # Save node_id to config
            self.config['node_id'] = self.node_id
            with open('node_config.json', 'w') as f:
                json.dump(self.config, f, indent=2)

            print(f"✓ Node registered: {self.node_id}")
        else:
            print(f"✗ Registration failed: {response.text}")
            raise Exception("Node registration failed")

    def get_total_vram(self):
        """Get total VRAM in GB"""
        if not GPU_AVAILABLE:
            return 0

        try:
            device_count = pynvml.nvmlDeviceGetCount()
            total_vram = 0
            for i in range(device_count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                total_vram += info.total
            return int(total_vram / (1024**3))
        except:
            return 0

    def get_gpu_model(self):
        """Get GPU model name"""
        if not GPU_AVAILABLE:
            return "No GPU"

        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return pynvml.nvmlDeviceGetName(handle).decode('utf-8')
        except:
            return "Unknown GPU"

    def collect_metrics(self):
        """Collect current system metrics"""

        # RAM
        ram_info = psutil.virtual_memory()
        available_ram_gb = int(ram_info.available / (1024**3))

        # VRAM
        available_vram_gb = self.get_available_vram()

        # CPU
        cpu_usage = psutil.cpu_percent(interval=1)

        # GPU usage
        gpu_usage = self.get_gpu_usage()

        # Temperature
        temp = self.get_gpu_temperature()

        metrics = {
            "available_ram_gb": available_ram_gb,
            "available_vram_gb": available_vram_gb,
            "cpu_usage_pct": cpu_usage,
            "gpu_usage_pct": gpu_usage,
            "temperature_c": temp,
            "latitude": self.config.get('latitude'),
            "longitude": self.config.get('longitude')
        }

        return metrics

    def get_available_vram(self):
        """Get available VRAM in GB"""
        if not GPU_AVAILABLE:
            return 0

        try:
            device_count = pynvml.nvmlDeviceGetCount()
            available_vram = 0
            for i in range(device_count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                available_vram += info.free
            return int(available_vram / (1024**3))
        except:
            return 0

    def get_gpu_usage(self):
        """Get GPU utilization percentage"""
        if not GPU_AVAILABLE:
            return 0

        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            return util.gpu
        except:
            return 0

    def get_gpu_temperature(self):
        """Get GPU temperature in Celsius"""
        if not GPU_AVAILABLE:
            return 0

        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            temp = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            return temp
        except:
            return 0

    def send_heartbeat(self, metrics):
        """Send heartbeat to API"""
        try:
            response = requests.post(
                f"{self.api_url}/api/nodes/{self.node_id}/heartbeat",
                headers={"X-API-Key": self.api_key},
                json=metrics,
                timeout=10
            )

            if response.status_code == 200:
                print(f"✓ Heartbeat sent: RAM {metrics['available_ram_gb']}GB, VRAM {metrics['available_vram_gb']}GB")
                return True
            else:
                print(f"✗ Heartbeat failed: {response.status_code}")
                return False
        except Exception as e:
            print(f"✗ Heartbeat error: {str(e)}")
            return False

    def run(self):
        """Main loop - send heartbeats continuously"""
        print(f"Starting Mnemo Node Agent for {self.config['name']}")
        print(f"Node ID: {self.node_id}")
        print(f"Heartbeat interval: {self.heartbeat_interval}s")
        print("Press Ctrl+C to stop\n")

        try:
            while True:
                metrics = self.collect_metrics()
                self.send_heartbeat(metrics)
                time.sleep(self.heartbeat_interval)

        except KeyboardInterrupt:
            print("\n\nStopping node agent...")
            if GPU_AVAILABLE:
                pynvml.nvmlShutdown()
            print("Agent stopped.")


if __name__ == "__main__":
    agent = MnemoNodeAgent()
    agent.run()

import Foundation
@testable import LiveSource
import Testing
import TestSupport

/// QMPClient against a real qemu-system-x86_64 (q35 -S, no guest OS).
@Suite struct QMPClientTests {
    static func vm(_ dir: TempDir, size: String = "8M") throws -> QemuVM {
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, size)
        return try QemuVM(disk: disk, directory: dir)
    }

    @Test func commandsRepliesAndErrors() throws {
        let dir = TempDir("qmp")
        let vm = try Self.vm(dir)
        defer { vm.quit() }
        let qmp = try QMPClient(path: vm.qmpSocket)
        defer { qmp.close() }
        #expect(qmp.version.hasPrefix("7.") || qmp.version.hasPrefix("8.") || qmp.version.hasPrefix("9."))
        let status = try qmp.execute("query-status") as? [String: Any]
        #expect(status?["status"] as? String == "prelaunch")
        // An error keeps QEMU's class and description.
        let error = #expect(throws: LiveError.self) {
            try qmp.execute("block-dirty-bitmap-remove", ["node": "disk0", "name": "absent"])
        }
        #expect(error?.qmpClass == "GenericError")
        #expect(error?.message.contains("absent") == true)
        let unknown = #expect(throws: LiveError.self) { try qmp.execute("no-such-command") }
        #expect(unknown?.qmpClass == "CommandNotFound")
        // The connection still works after errors.
        try qmp.execute("block-dirty-bitmap-add", ["node": "disk0", "name": "b0", "persistent": true])
        try vm.write(0xab, at: 0, length: 65536)
        #expect(try vm.bitmaps()["b0"]?.count == 65536)
    }

    /// Events that arrive while a reply is awaited are queued and found by waitForEvent.
    @Test func eventsAreQueuedWhileWaiting() throws {
        let dir = TempDir("qmp-events")
        let vm = try Self.vm(dir)
        defer { vm.quit() }
        let qmp = try QMPClient(path: vm.qmpSocket)
        defer { qmp.close() }
        let fleece = dir.file("fleece.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", fleece, "8M")
        try qmp.execute("blockdev-add", ["driver": "qcow2", "node-name": "fleece", "discard": "unmap",
                                         "file": ["driver": "file", "filename": fleece], "backing": "disk0"])
        try qmp.execute("blockdev-backup", ["job-id": "fleece-job", "device": "disk0", "target": "fleece", "sync": "none",
                                            "filter-node-name": "cbw"])
        try qmp.execute("nbd-server-start", ["addr": ["type": "unix", "data": ["path": dir.file("nbd.sock")]]])
        try qmp.execute("block-export-add", ["type": "nbd", "id": "backup", "node-name": "fleece", "name": "disk0",
                                             "writable": false])
        try qmp.execute("block-export-del", ["id": "backup"])
        try qmp.execute("block-job-cancel", ["device": "fleece-job"])
        // Both events may already sit in the queue; order of waiting does not matter.
        let cancelled = try qmp.waitForEvent("BLOCK_JOB_CANCELLED", timeout: 10) { $0["device"] as? String == "fleece-job" }
        #expect(cancelled.data["len"] as? Int == 8 << 20)
        try qmp.waitForEvent("BLOCK_EXPORT_DELETED", timeout: 10) { $0["id"] as? String == "backup" }
        try qmp.execute("blockdev-del", ["node-name": "fleece"])
        try qmp.execute("nbd-server-stop")
        let left = try vm.leftovers()
        #expect(left.exports == 0 && left.jobs == 0 && !left.nodes.contains("fleece"))
    }

    @Test func waitsTimeOut() throws {
        let dir = TempDir("qmp-timeout")
        let vm = try Self.vm(dir)
        defer { vm.quit() }
        let qmp = try QMPClient(path: vm.qmpSocket)
        defer { qmp.close() }
        let start = Date()
        let error = #expect(throws: LiveError.self) { try qmp.waitForEvent("NEVER_SENT", timeout: 1) }
        #expect(error?.message.contains("NEVER_SENT") == true)
        #expect(Date().timeIntervalSince(start) < 5)
    }

    /// A monitor serves one client: a second one gets no greeting and is told the monitor is busy.
    @Test func busyMonitorIsReported() throws {
        let dir = TempDir("qmp-busy")
        let vm = try Self.vm(dir)
        defer { vm.quit() }
        let first = try QMPClient(path: vm.qmpSocket)
        defer { first.close() }
        let error = #expect(throws: LiveError.self) { try QMPClient(path: vm.qmpSocket, timeout: 1) }
        #expect(error?.errorCode == .locked)
    }

    /// QEMU killed while a command waits: an error, not a hang.
    @Test func qemuKilledIsAnError() throws {
        let dir = TempDir("qmp-killed")
        let vm = try Self.vm(dir)
        let qmp = try QMPClient(path: vm.qmpSocket)
        defer { qmp.close() }
        vm.stop()
        #expect(throws: LiveError.self) { try qmp.execute("query-status") }
        #expect(throws: LiveError.self) { try QMPClient(path: vm.qmpSocket, timeout: 1) }
    }
}

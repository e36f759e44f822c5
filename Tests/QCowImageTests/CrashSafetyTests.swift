import Foundation
@testable import QCowImage
import Testing
import TestSupport

/// For a write workload on a `MemoryDevice`: stop at every operation N, and
/// check what is on "disk" with `qemu-img check` — no corruption allowed,
/// leaks allowed. Also every state where, since the last sync, only one of
/// the pending writes reached the disk (writes between barriers may land in
/// any order).
@Suite struct CrashSafetyTests {
    struct Variant: CustomTestStringConvertible, Sendable {
        var clusterSize: Int
        var refcountBits: Int
        var extendedL2 = false
        var testDescription: String { "\(clusterSize)B rc\(refcountBits)\(extendedL2 ? " extl2" : "")" }
    }

    static let variants = [
        Variant(clusterSize: 512, refcountBits: 64),
        Variant(clusterSize: 4096, refcountBits: 1),
        Variant(clusterSize: 65536, refcountBits: 16, extendedL2: true),
    ]

    /// The workload: new L2 tables, refcount blocks and table growth, in-place
    /// and copy-on-write overwrites, zeros, discards and compressed clusters.
    func workload(_ image: QCowFile) throws {
        let cs = image.clusterSize
        var rng = SeededRandom(seed: UInt64(cs))
        func write(_ offset: Int, _ length: Int) throws {
            var data = [UInt8](repeating: 0, count: length)
            data.withUnsafeMutableBytes { raw in
                var i = 0
                while i + 8 <= length { raw.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self); i += 8 }
            }
            try data.withUnsafeBytes { try image.write($0, at: UInt64(offset)) }
        }
        try write(0, 3 * cs + 100)
        try write(40 * cs + 7, 2 * cs)
        try image.writeZeroes(at: UInt64(cs), length: UInt64(2 * cs))
        try write(cs / 2, cs)
        let compressible = [UInt8](repeating: 0x33, count: cs)
        try compressible.withUnsafeBytes { try image.writeCompressed(cluster: $0, at: UInt64(8 * cs)) }
        try compressible.withUnsafeBytes { try image.writeCompressed(cluster: $0, at: UInt64(9 * cs)) }
        try image.discard(at: 0, length: UInt64(cs))
        try write(8 * cs + 3, 100)
        try write(100 * cs, 20 * cs)
        try image.flush()
    }

    @Test(arguments: variants)
    func everyCrashPointLeavesNoCorruption(_ v: Variant) throws {
        let dir = TempDir()
        var options = QCowCreateOptions(size: 256 * UInt64(v.clusterSize))
        options.clusterSize = v.clusterSize
        options.refcountBits = v.refcountBits
        options.extendedL2 = v.extendedL2
        let setup = MemoryDevice(name: "crash.qcow2")
        try QCowCreator.create(on: setup, options: options)
        let initial = setup.bytes

        // The full run, logged.
        let full = MemoryDevice(name: "crash.qcow2", bytes: initial)
        full.logging = true
        try workload(try ImageOpener.openQCow(on: full, writable: true, files: MemoryFiles()))
        let log = full.log
        #expect(log.count > 20)
        try checkClean(full.bytes, dir: dir, label: "complete run", allowLeaks: false)

        var states = 0

        for n in 0..<log.count {
            let device = MemoryDevice(name: "crash.qcow2", bytes: initial)
            device.failAtOperation = n
            #expect(throws: QCowError.self) { try workload(try ImageOpener.openQCow(on: device, writable: true, files: MemoryFiles())) }
            #expect(same(device.bytes, MemoryDevice.replay(log, count: n, onto: initial)), "workload is not deterministic at \(n)")
            // A sync changes no bytes: the state after it was checked already.
            if n > 0, case .sync = log[n - 1] { continue }
            try checkClean(device.bytes, dir: dir, label: "stopped before operation \(n)", allowLeaks: true)
            states += 1
        }
        // Reordering within a barrier: from each sync, each later write alone.
        var lastSync = 0
        for (i, op) in log.enumerated() {
            if case .sync = op { lastSync = i + 1; continue }
            guard i > lastSync, case .write = op else { continue }
            var bytes = MemoryDevice.replay(log, count: lastSync, onto: initial)
            bytes = MemoryDevice.replay([op], count: 1, onto: bytes)
            try checkClean(bytes, dir: dir, label: "only operation \(i) after the sync at \(lastSync)", allowLeaks: true)
            states += 1
        }
        #expect(states > log.count / 2)
        print("crash states checked for \(v.testDescription): \(states) (log \(log.count))")
    }

    /// Byte equality at memcmp speed (the arrays are megabytes; tests build unoptimized).
    func same(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        a.count == b.count && a.withUnsafeBytes { x in b.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 } }
    }

    /// `qemu-img check`: 0 clean, 3 leaks only (allowed after a crash), 2 corruption.
    func checkClean(_ bytes: [UInt8], dir: TempDir, label: String, allowLeaks: Bool) throws {
        let path = dir.file("state.qcow2")
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let result = try Tools.run("qemu-img", ["check", "-f", "qcow2", path])
        let ok = result.status == 0 || (allowLeaks && result.status == 3)
        #expect(ok, "\(label): qemu-img check exited \(result.status): \(result.stdout) \(result.stderr)")
    }
}

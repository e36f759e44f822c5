import Foundation
import QCowImage
import Testing
import TestSupport

/// `ImageCommitter` against `qemu-img commit -d` on chains QEMU made.
@Suite struct CommitTests {
    struct Variant: CustomTestStringConvertible, Sendable {
        var name: String
        var base: (format: String, options: String)
        var topOptions: String
        var testDescription: String { name }
    }

    static let variants = [
        Variant(name: "qcow2 into qcow2", base: ("qcow2", "cluster_size=65536"), topOptions: "cluster_size=65536"),
        Variant(name: "4k into extended L2", base: ("qcow2", "cluster_size=65536,extended_l2=on"), topOptions: "cluster_size=4096"),
        Variant(name: "extended L2 into 512", base: ("qcow2", "cluster_size=512,refcount_bits=2"),
                topOptions: "cluster_size=32768,extended_l2=on"),
        Variant(name: "qcow2 into raw", base: ("raw", ""), topOptions: "cluster_size=65536"),
        Variant(name: "into v2", base: ("qcow2", "compat=0.10"), topOptions: "cluster_size=65536"),
    ]

    /// Builds base + top in `dir` with qemu-img/qemu-io.
    func makeChain(_ v: Variant, in dir: String) throws {
        let base = "\(dir)/base.img"
        var args = ["create", "-q", "-f", v.base.format]
        if !v.base.options.isEmpty { args += ["-o", v.base.options] }
        try Tools.qemu("qemu-img", args + [base, "8M"])
        try Tools.qemuIO(base, format: v.base.format, ["write -P 0xa1 0 3M", "write -P 0xa2 5M 1M"])
        try Tools.qemu("qemu-img", ["create", "-q", "-f", "qcow2", "-o", v.topOptions, "-b", "base.img", "-F", v.base.format,
                                    "\(dir)/top.qcow2", "8M"])
        try Tools.qemuIO("\(dir)/top.qcow2", format: "qcow2",
                         ["write -P 0xb1 100k 300k", "write -z 1M 512k", "write -P 0xb2 4100k 2M", "discard 2M 128k",
                          "write -P 0xb3 7M 3000"])
    }

    @Test(arguments: variants)
    func matchesQemuCommit(_ v: Variant) throws {
        let ours = TempDir()
        let theirs = TempDir()
        try makeChain(v, in: ours.path)
        for name in ["base.img", "top.qcow2"] {
            try FileManager.default.copyItem(atPath: ours.file(name), toPath: theirs.file(name))
        }
        try Tools.qemuImg("convert", "-O", "raw", ours.file("top.qcow2"), ours.file("before.raw"))

        var observed: [Range<UInt64>] = []
        let result = try ImageCommitter.commit(topPath: ours.file("top.qcow2"), prepareBase: { base in
            (base as? QCowFile)?.writeObserver = { range, _ in observed.append(range) }
        })
        try Tools.qemuImg("commit", "-q", "-d", theirs.file("top.qcow2"))

        #expect(result.dataBytes > 0)
        try Tools.qemu("qemu-img", ["compare", "-q", "-f", v.base.format, "-F", v.base.format, ours.file("base.img"),
                                    theirs.file("base.img")])
        try Tools.qemuImg("compare", "-q", "-F", "raw", ours.file("top.qcow2"), ours.file("before.raw"))
        if v.base.format == "qcow2" {
            try Tools.qemuImg("check", "-f", "qcow2", ours.file("base.img"))
            // Every range the top image allocated was reported to the base's observer.
            let top = try ImageOpener.open(ours.file("top.qcow2"))
            defer { top.close() }
            var offset: UInt64 = 0
            while offset < top.virtualSize {
                let ext = try top.layerStatus(at: offset, maxLength: top.virtualSize - offset)
                if ext.mapping != .unallocated {
                    let covered = observed.contains { $0.lowerBound <= offset && $0.upperBound >= offset + ext.length }
                    #expect(covered, "range \(offset)+\(ext.length) was not reported")
                }
                offset += ext.length
            }
        }
    }

    @Test func refusesAnImageWithoutBackingFile() throws {
        let dir = TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", dir.file("lone.qcow2"), "1M")
        #expect(throws: QCowError.self) { try ImageCommitter.commit(topPath: dir.file("lone.qcow2")) }
    }
}

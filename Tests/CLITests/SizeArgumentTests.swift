import Foundation
import Testing
import TestSupport

/// Sizes on the command line (`Sources/qbackup/Sizes.swift`): a value that is not a size,
/// a negative one, or one outside the option's range is a usage error — exit 2, one
/// `qbackup: error:` line saying what is wrong with the value — and nothing is created.
@Suite struct SizeArgumentTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var arguments: [String]
        /// Words the error line must contain.
        var expect: [String]
        var testDescription: String { arguments.joined(separator: " ") }
    }

    static let cases: [Case] = [
        Case(arguments: ["create", "OUT", "abc"], expect: ["'abc' is not a size"]),
        Case(arguments: ["create", "OUT", "-1"], expect: ["'-1' is not a size", "negative"]),
        Case(arguments: ["create", "OUT", "16E"], expect: ["'16E' is too large"]),
        Case(arguments: ["create", "OUT", "99999999999999999999"], expect: ["is not a size"]),
        Case(arguments: ["create", "OUT", "1M", "--cluster-size", "-1"], expect: ["'-1' is not a size", "negative"]),
        Case(arguments: ["create", "OUT", "1M", "--cluster-size", "0"], expect: ["cluster size must be a power of two"]),
        Case(arguments: ["create", "OUT", "1M", "--cluster-size", "3K"], expect: ["cluster size must be a power of two"]),
        Case(arguments: ["create", "OUT", "1M", "--cluster-size", "8E"], expect: ["too large"]),
        Case(arguments: ["flatten", "DISK", "OUT", "--cluster-size", "1X"], expect: ["'1X' is not a size"]),
        Case(arguments: ["flatten", "DISK", "OUT", "--cluster-size", "-64K"], expect: ["negative"]),
        Case(arguments: ["backup", "DISK", "--repo", "OUT", "--cluster-size", "-1"], expect: ["negative"]),
        Case(arguments: ["backup", "DISK", "--repo", "OUT", "--cluster-size", "abc"], expect: ["'abc' is not a size"]),
        Case(arguments: ["backup", "DISK", "--repo", "OUT", "--cluster-size", "256"], expect: ["cluster size"]),
        Case(arguments: ["bitmap", "add", "DISK", "b", "--granularity", "-1"], expect: ["negative"]),
        Case(arguments: ["bitmap", "add", "DISK", "b", "--granularity", "0"], expect: ["granularity"]),
        Case(arguments: ["bitmap", "add", "DISK", "b", "--granularity", "4G"], expect: ["granularity"]),
        Case(arguments: ["bitmap", "add", "DISK", "b", "--granularity", "12Q"], expect: ["'12Q' is not a size"]),
    ]

    @Test(arguments: cases)
    func badSizeIsAUsageError(_ c: Case) throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "1M")
        let before = try Data.contents(of: disk)
        let out = dir.file("out")
        let arguments = c.arguments.map { $0 == "OUT" ? out : $0 == "DISK" ? disk : $0 }
        let result = try QBackupBinary.run(arguments)
        #expect(result.status == 2 && result.failedCleanly, "exit \(result.status): \(result.stderr)")
        for word in c.expect { #expect(result.errorLines.first?.contains(word) == true, "want '\(word)': \(result.stderr)") }
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(try Data.contents(of: disk) == before)
    }
}

import Foundation
import Testing
import TestSupport

/// `--help` as an admin reads it in an 80-column terminal.
@Suite struct HelpTests {
    static let commands: [[String]] = [
        [], ["info"], ["map"], ["compare"], ["flatten"], ["list"], ["restore"], ["check"], ["create"], ["commit"],
        ["backup"], ["merge"], ["verify"], ["bitmap"], ["bitmap", "list"], ["bitmap", "add"], ["bitmap", "merge"],
        ["bitmap", "dump"],
    ]
    /// The commands whose work is long enough for a progress bar.
    static let withProgress: Set<String> = ["compare", "flatten", "restore", "commit", "backup", "merge", "verify"]

    static func help(_ command: [String]) throws -> String {
        let result = try QBackupBinary.run(command + ["--help"], environment: ["COLUMNS": "80"])
        #expect(result.status == 0, "\(command): \(result.stderr)")
        return result.stdout
    }

    /// The overview paragraphs (before USAGE) wrap at the width, never at a hard newline mid-sentence:
    /// inside a paragraph a line ends only where the next word would not have fitted (ArgumentParser
    /// fills to 79 columns of 80);
    /// no line is wider than 80 (but the usage synopsis, which ArgumentParser never wraps).
    @Test(arguments: commands)
    func paragraphsReflowAtEightyColumns(command: [String]) throws {
        let text = try Self.help(command)
        for line in text.split(separator: "\n") where !line.hasPrefix("USAGE:") {
            #expect(line.count <= 80, "\(command): \(line)")
        }
        let overview = text.components(separatedBy: "\nUSAGE:")[0]
        for paragraph in overview.components(separatedBy: "\n\n") {
            let lines = paragraph.split(separator: "\n").map(String.init)
            // Indented lines are examples (a cron line), laid out by hand.
            guard lines.count > 1, !lines.contains(where: { $0.hasPrefix(" ") }) else { continue }
            for (line, next) in zip(lines, lines.dropFirst()) {
                let word = next.split(separator: " ").first ?? ""
                #expect(line.count + 1 + word.count >= 80, "\(command): a line broken early: '\(line)' / '\(next)'")
            }
        }
    }

    @Test(arguments: commands)
    func progressOnlyWhereItWorks(command: [String]) throws {
        let text = try Self.help(command)
        let offered = text.contains("-p, --progress")
        let expected = command.count == 1 && Self.withProgress.contains(command[0])
        #expect(offered == expected, "\(command)")
    }

    @Test func progressFlagIsAUsageErrorWhereItDoesNothing() throws {
        let result = try QBackupBinary.run(["info", "-p", "/nonexistent.qcow2"])
        #expect(result.status == 2, "\(result.stderr)")
    }

    @Test func restoreDescribesFormatAndOutputApart() throws {
        let text = try Self.help(["restore"])
        func description(_ option: String) -> String {
            let lines = text.split(separator: "\n").map(String.init)
            guard let i = lines.firstIndex(where: { $0.trimmingCharacters(in: .whitespaces).hasPrefix(option) }) else {
                return ""
            }
            return lines[i].components(separatedBy: ")").dropFirst().joined(separator: ")")
                + (i + 1 < lines.count && lines[i + 1].hasPrefix("      ") ? lines[i + 1] : "")
        }
        let format = description("--format")
        let output = description("--output")
        #expect(!format.isEmpty && !output.isEmpty, "\(text)")
        #expect(format.contains("qcow2") && format.contains("raw") && !format.contains("json"), "\(format)")
        #expect(output.contains("json") && !output.contains("qcow2"), "\(output)")
        #expect(!format.lowercased().contains("output format") || !output.lowercased().contains("output format"))
    }
}

import Foundation
import Testing
import TestSupport

/// Issue 17 item 14: `qbackup --generate-completion-script bash|zsh|fish` completes image
/// paths as files and repository folders as directories. The bash script is run in a real
/// bash, completing a path in a folder that holds a repository folder and a disk file.
@Suite struct CompletionTests {
    /// What bash's completion of the last word of `line` offers (the script sourced, `_qbackup` called).
    static func bashCompletions(_ script: String, _ line: String) throws -> [String] {
        let driver = """
            source "$1"
            line="$2"
            read -ra COMP_WORDS <<< "$line"
            [[ "$line" == *" " ]] && COMP_WORDS+=("")
            COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
            COMP_LINE="$line"; COMP_POINT=${#line}
            _qbackup qbackup "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
            printf '%s\\n' "${COMPREPLY[@]}"
            """
        let result = try Tools.run("bash", ["-c", driver, "complete", script, line])
        #expect(result.status == 0, "\(result.stderr)")
        return result.stdout.split(separator: "\n").map(String.init).sorted()
    }

    @Test func imagesCompleteAsFilesAndRepositoriesAsFolders() throws {
        let dir = TempDir("qbackup-completion")
        try FileManager.default.createDirectory(atPath: dir.file("repo-a"), withIntermediateDirectories: false)
        FileManager.default.createFile(atPath: dir.file("disk-a.qcow2"), contents: Data())
        let scripts = TempDir("qbackup-completion-script")
        let script = scripts.file("qbackup.bash")
        let generated = try QBackupBinary.run(["--generate-completion-script", "bash"])
        #expect(generated.status == 0, "\(generated.stderr)")
        try generated.stdout.write(toFile: script, atomically: true, encoding: .utf8)
        let both = [dir.file("disk-a.qcow2"), dir.file("repo-a")]
        let folders = [dir.file("repo-a")]
        let cases: [(String, [String])] = [
            ("qbackup info \(dir.path)/", both), ("qbackup check \(dir.path)/", both),
            ("qbackup backup \(dir.path)/", both), ("qbackup bitmap list \(dir.path)/", both),
            ("qbackup restore \(dir.path)/repo-a --to \(dir.path)/", both),
            ("qbackup list \(dir.path)/", folders), ("qbackup verify \(dir.path)/", folders),
            ("qbackup merge \(dir.path)/", folders), ("qbackup restore \(dir.path)/", folders),
            ("qbackup backup --repo \(dir.path)/", folders), ("qbackup repair \(dir.path)/", folders),
        ]
        for (line, expected) in cases {
            #expect(try Self.bashCompletions(script, line) == expected, "\(line)")
        }
        // zsh and fish: generated, and they name file and directory completion for the same places.
        let zsh = try QBackupBinary.run(["--generate-completion-script", "zsh"])
        #expect(zsh.status == 0 && zsh.stdout.contains("#compdef qbackup") && zsh.stdout.contains("_files -/"), "\(zsh.stderr)")
        let fish = try QBackupBinary.run(["--generate-completion-script", "fish"])
        #expect(fish.status == 0, "\(fish.stderr)")
        #expect(fish.stdout.contains("\"qbackup list\" -eq 1' -fa '(__qbackup_complete_directories)'"))
    }
}
